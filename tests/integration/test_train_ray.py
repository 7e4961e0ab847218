"""Real Ray Train runs (Train V2, CPU workers) of the tiny model, tracked in a real MLflow store."""

import csv
import json
from pathlib import Path

import pytest
import ray.train
import ray.train.torch
import torch
from mlflow import MlflowClient
from ray.train import UserCallback
from ray.train.torch import TorchTrainer

from instseg.config import Config
from instseg.data.loaders import build_datasets, build_loader
from instseg.engine.checkpoint import load_checkpoint
from instseg.metrics.coco_eval import CocoEvaluator
from instseg.metrics.names import COCO_STAT_NAMES, EPOCH, FITNESS, TRAIN_LOSS_KEYS
from instseg.metrics.results import RESULTS_CSV
from instseg.models import build_model
from instseg.models.bundle import load_bundle
from instseg.tracking.registry import download_bundle
from ray_jobs.driver_run import create_driver_run, fit_and_log
from ray_jobs.train import run_training
from ray_jobs.train_loop import NODES_TAG, validation_step
from ray_jobs.trainer import WORKER_ENV, build_trainer

pytestmark = pytest.mark.integration


def test_train_reports_tracks_checkpoints_and_stops_early(local_ray, tiny_config, tmp_path):
    # 4 epochs allowed; an improvement of 1.0 in fitness is impossible, so patience 1 stops after epoch 2
    # with the soft-Dice term on the mask head
    cfg = tiny_config(
        "train.epochs=4",
        "train.patience=1",
        "train.min_delta=1.0",
        "model.mask_dice_weight=0.5",
        "run_name=it-train",
        "tracking.system_metrics_s=1",
        "train.plot_every=1",
    )
    summary = run_training(cfg)

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "4" and run.data.params["model.arch"] == "tiny"
    assert len(run.data.tags["instseg.dataset_fingerprint"]) == 16
    assert run.data.tags["version.torch"] == torch.__version__.split("+")[0] or run.data.tags[
        "version.torch"
    ].startswith(torch.__version__[:4])
    for key in (
        FITNESS,
        "val/segm_map",
        "val/bbox_map",
        "train/loss",
        "val/loss",
        "train/loss_mask_dice",
        *(f"train/{k}" for k in TRAIN_LOSS_KEYS),
    ):
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == [1, 2], key
    assert run.data.tags["instseg.early_stopped"] == "true" and run.data.tags["instseg.stopped_epoch"] == "2"
    assert "did not improve by more than 1.0 for 1 epochs" in run.data.tags["instseg.stop_reason"]
    assert [m.value for m in client.get_metric_history(summary.run_id, "train/early_stopped")] == [0.0, 1.0]
    # all 12 COCO stats for both IoU types
    assert all(f"val/{t}_{name}" in run.data.metrics for t in ("bbox", "segm") for name in COCO_STAT_NAMES)
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"config.yaml", "label_map.json", "bundle", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(summary.run_id, "plots")}
    assert plots == {
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "PR_curve.png",
        "P_curve.png",
        "R_curve.png",
        "F1_curve.png",
        "loss_curves.png",
        "val_predictions.png",
        "val_predictions_epoch1.png",
    }
    curve_keys = ("segm_precision", "segm_recall", "segm_f1", "segm_dice", "bbox_precision", "bbox_recall")
    for key in (f"val/{name}" for name in curve_keys):
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == [1, 2], key

    # system metrics from the worker's node, and the data as dataset inputs with the fingerprint and split sizes
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert inputs["training"].name == f"{Path(cfg.data.root).name}/train"
    assert inputs["training"].digest == run.data.tags["instseg.dataset_fingerprint"][: len(inputs["training"].digest)]
    assert json.loads(inputs["validation"].profile)["images"] == len(build_datasets(cfg.data)[1])

    # results.csv, one row per epoch, beside the checkpoints and in the MLflow run, with the numbers MLflow has
    beside = Path(cfg.ray.storage_path, "it-train", RESULTS_CSV)
    rows = list(csv.DictReader(beside.open()))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert float(rows[1]["metrics/mAP50-95(M)"]) == pytest.approx(run.data.metrics["val/segm_map"])
    assert float(rows[1]["metrics/precision(B)"]) == pytest.approx(run.data.metrics["val/bbox_precision"])
    assert float(rows[1]["fitness"]) == pytest.approx(run.data.metrics[FITNESS])
    assert float(rows[1]["time"]) > float(rows[0]["time"]) > 0  # cumulative, as in Ultralytics
    logged = Path(client.download_artifacts(summary.run_id, RESULTS_CSV, str(tmp_path)))
    assert logged.read_text() == beside.read_text()

    state = load_checkpoint(summary.checkpoint_path)  # weights_only=True inside
    assert state["epoch"] in (1, 2) and state["label_map"]["names"] == ["circle", "rectangle", "triangle"]
    assert [int(epoch[EPOCH]) for epoch in state["results"]] == list(range(1, state["epoch"] + 1))
    assert {"model", "optimizer", "scheduler", "config", "metrics", "early_stopping"} <= set(state)

    bundle = download_bundle(summary.tracking_uri, summary.bundle_uri, tmp_path / "dl")
    model, label_map, meta = load_bundle(bundle)
    assert label_map.num_classes == 4 and not model.training
    assert meta["metrics"][FITNESS] == pytest.approx(state["metrics"][FITNESS])


class ReportRecorder(UserCallback):
    """Runs in the Train controller: one JSON line per report the workers made (rank 0's metrics)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(metrics[0]) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ddp_workers_train_and_report_once_per_epoch(local_ray, tiny_config, tmp_path):
    """2 CPU workers (gloo): distinct shards, losses averaged, validation predictions gathered on rank 0,
    and exactly one ray.train.report per epoch (each blocks ~2 s in Train V2)."""
    cfg = tiny_config("train.epochs=2", "ray.num_workers=2", "run_name=it-ddp")
    reports = tmp_path / "reports.txt"
    run_id = create_driver_run(cfg, "it-ddp", kind="train")
    trainer = build_trainer(cfg, run_id=run_id, name="it-ddp", callbacks=[ReportRecorder(reports)])
    summary = fit_and_log(trainer, cfg, run_id)
    assert [r[EPOCH] for r in ReportRecorder.read(reports)] == [1, 2], "the loop must report exactly once per epoch"
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.params["ray.world_size"] == "2"
    assert run.data.params["train.global_batch"] == "8"
    assert float(run.data.params["train.effective_lr"]) == pytest.approx(2 * cfg.train.lr)  # linear rule, 2 workers
    assert len(set(run.data.tags[NODES_TAG].split(","))) == 1  # one node, both ranks recorded
    assert FITNESS in run.data.metrics and "val/segm_map" in run.data.metrics


def _validate_in_workers(loop_config: dict) -> None:
    """Ray Train worker: the training loop's validation step on fixed weights, reported by rank 0."""
    cfg = Config.model_validate(loop_config["config"])
    train_set, val_set = build_datasets(cfg.data)
    core = build_model(cfg.model, train_set.label_map.num_classes)  # model.weights: the saved state dict
    model = ray.train.torch.prepare_model(core)
    device = ray.train.torch.get_device()
    evaluator = CocoEvaluator(val_set.coco, train_set.label_map)
    metrics, _ = validation_step(
        getattr(model, "module", model), val_set, build_loader(val_set, cfg.data, shuffle=False), cfg, device, evaluator
    )
    ray.train.report(
        {
            **metrics,
            "detections": float(len(evaluator.results)) if ray.train.get_context().get_world_rank() == 0 else -1.0,
        }
    )


def test_two_workers_report_the_metrics_of_one_on_the_same_weights(
    local_ray, tiny_config, overfit_root, overfit_weights, tmp_path
):
    # weights trained on these images: many detections, so the comparison compares something
    cfg = tiny_config(f"model.weights={overfit_weights}", f"data.root={overfit_root}")
    results = {}
    for workers in (1, 2):
        reports = tmp_path / f"reports-{workers}.jsonl"
        trainer = TorchTrainer(
            _validate_in_workers,
            train_loop_config={"config": cfg.model_dump()},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.9}),
            run_config=ray.train.RunConfig(
                name=f"validate-{workers}",
                storage_path=str(tmp_path / "ray_results"),
                worker_runtime_env={"env_vars": WORKER_ENV},
                callbacks=[ReportRecorder(reports)],
            ),
        )
        trainer.fit()
        (results[workers],) = ReportRecorder.read(reports)
    one, two = results[1], results[2]
    assert one["val/bbox_mar100"] > 0 and one["detections"] > 0, (
        "the model must detect something for the comparison to mean anything"
    )
    assert one.keys() == two.keys()
    # COCO stats, P / R / F1 / Dice: the same predictions, so the same numbers
    evaluated = [k for k in one if not k.startswith("val/loss")]
    assert {k: two[k] for k in evaluated} == pytest.approx({k: one[k] for k in evaluated}, abs=1e-12)
    # validation losses: rank 0 over the whole split either way; float32 sums may differ in the last bit
    losses = [k for k in one if k.startswith("val/loss")]
    assert {k: two[k] for k in losses} == pytest.approx({k: one[k] for k in losses}, rel=1e-6)
