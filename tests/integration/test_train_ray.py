"""One real Ray Train run (Train V2, 1 CPU worker) of the tiny model, tracked in a real MLflow store."""

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from instseg.engine.checkpoint import load_checkpoint
from instseg.metrics.names import COCO_STAT_NAMES, FITNESS, TRAIN_LOSS_KEYS
from instseg.models.bundle import load_bundle
from instseg.tracking.registry import download_bundle
from ray_jobs.train import run_training

pytestmark = pytest.mark.integration


def test_train_reports_tracks_checkpoints_and_stops_early(local_ray, tiny_config, tmp_path):
    # 4 epochs allowed; an improvement of 1.0 in fitness is impossible, so patience 1 stops after epoch 2
    # with the soft-Dice term on the mask head
    cfg = tiny_config("train.epochs=4", "train.patience=1", "train.min_delta=1.0", "model.mask_dice_weight=0.5", "run_name=it-train")
    summary = run_training(cfg)

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "4" and run.data.params["model.arch"] == "tiny"
    assert len(run.data.tags["instseg.dataset_fingerprint"]) == 16
    assert run.data.tags["version.torch"] == torch.__version__.split("+")[0] or run.data.tags["version.torch"].startswith(torch.__version__[:4])
    for key in (FITNESS, "val/segm_map", "val/bbox_map", "train/loss", "val/loss", "train/loss_mask_dice", *(f"train/{k}" for k in TRAIN_LOSS_KEYS)):
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == [1, 2], key
    assert run.data.tags["instseg.early_stopped"] == "true" and run.data.tags["instseg.stopped_epoch"] == "2"
    assert "did not improve by more than 1.0 for 1 epochs" in run.data.tags["instseg.stop_reason"]
    assert [m.value for m in client.get_metric_history(summary.run_id, "train/early_stopped")] == [0.0, 1.0]
    # all 12 COCO stats for both IoU types
    assert all(f"val/{t}_{name}" in run.data.metrics for t in ("bbox", "segm") for name in COCO_STAT_NAMES)
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"config.yaml", "label_map.json", "bundle", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(summary.run_id, "plots")}
    assert plots == {"confusion_matrix.png", "confusion_matrix_normalized.png", "PR_curve.png", "P_curve.png", "R_curve.png",
                     "F1_curve.png", "loss_curves.png", "val_predictions.png"}
    for key in ("val/segm_precision", "val/segm_recall", "val/segm_f1", "val/segm_dice"):
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == [1, 2], key

    state = load_checkpoint(summary.checkpoint_path)  # weights_only=True inside
    assert state["epoch"] in (1, 2) and state["label_map"]["names"] == ["circle", "rectangle", "triangle"]
    assert {"model", "optimizer", "scheduler", "config", "metrics", "early_stopping"} <= set(state)

    bundle = download_bundle(summary.tracking_uri, summary.bundle_uri, tmp_path / "dl")
    model, label_map, meta = load_bundle(bundle)
    assert label_map.num_classes == 4 and not model.training
    assert meta["metrics"][FITNESS] == pytest.approx(state["metrics"][FITNESS])


def test_two_ddp_workers_train_and_share_one_evaluation(local_ray, tiny_config):
    """2 CPU workers (gloo): distinct shards, losses averaged, validation predictions gathered on rank 0."""
    cfg = tiny_config("train.epochs=1", "ray.num_workers=2", "run_name=it-ddp")
    summary = run_training(cfg)
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.params["ray.world_size"] == "2"
    assert FITNESS in run.data.metrics and "val/segm_map" in run.data.metrics
