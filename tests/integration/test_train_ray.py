"""One real Ray Train run (Train V2, 1 CPU worker) of the tiny model, tracked in a real MLflow store."""

import pytest
import torch
from mlflow import MlflowClient

from instseg.engine.checkpoint import load_checkpoint
from instseg.metrics.names import FITNESS, TRAIN_LOSS_KEYS
from instseg.models.bundle import load_bundle
from instseg.tracking.registry import download_bundle
from ray_jobs.train import run_training

pytestmark = pytest.mark.integration


def test_train_two_epochs_reports_tracks_and_checkpoints(local_ray, tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=2", "run_name=it-train")
    summary = run_training(cfg)

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.arch"] == "tiny"
    assert len(run.data.tags["instseg.dataset_fingerprint"]) == 16
    assert run.data.tags["version.torch"] == torch.__version__.split("+")[0] or run.data.tags["version.torch"].startswith(torch.__version__[:4])
    for key in (FITNESS, "val/segm_map", "val/bbox_map", "train/loss", *(f"train/{k}" for k in TRAIN_LOSS_KEYS)):
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == [1, 2], key
    # all 12 COCO stats for both IoU types
    assert sum(k.startswith("val/bbox_") for k in run.data.metrics) == 12
    assert sum(k.startswith("val/segm_") for k in run.data.metrics) == 12
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"config.yaml", "label_map.json", "bundle"} <= artifacts

    state = load_checkpoint(summary.checkpoint_path)  # weights_only=True inside
    assert state["epoch"] in (1, 2) and state["label_map"]["names"] == ["circle", "rectangle", "triangle"]
    assert {"model", "optimizer", "scheduler", "config", "metrics"} <= set(state)

    bundle = download_bundle(summary.tracking_uri, summary.bundle_uri, tmp_path / "dl")
    model, label_map, meta = load_bundle(bundle)
    assert label_map.num_classes == 4 and not model.training
    assert meta["metrics"][FITNESS] == pytest.approx(state["metrics"][FITNESS])
