"""Real datasets through the real Ray Train job: converted COCO8-seg, and a broken dataset under on_invalid=skip."""

import json
import shutil

import pytest
from mlflow import MlflowClient

from instseg.cli import main as cli_main
from instseg.data.formats import convert
from instseg.metrics.names import FITNESS
from ray_jobs.train import run_training
from tests.helpers import shared_dataset

pytestmark = pytest.mark.integration


def test_coco8_seg_trains_one_tiny_epoch(local_ray, tiny_config, tmp_path):
    convert(shared_dataset("coco8-seg"), tmp_path / "coco8")
    # coco8-seg mixes landscape and portrait images: batches grouped by orientation
    cfg = tiny_config(
        f"data.root={tmp_path / 'coco8'}", "train.epochs=1", "data.batch_size=2", "data.aspect_ratio_grouping=true"
    )
    summary = run_training(cfg)
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and FITNESS in run.data.metrics
    assert (
        json.loads((tmp_path / "coco8" / "annotations" / "instances_val.json").read_text())["categories"][0]["name"]
        == "person"
    )


def test_coco128_seg_trains_after_data_split(local_ray, tiny_config, tmp_path):
    """COCO128-seg comes as one split (train2017): `instseg data split` gives it the train / val a run needs."""
    root = tmp_path / "coco128"
    convert(shared_dataset("coco128-seg"), root, names="coco80")
    assert cli_main(["data", "split", str(root), "--val", "0.2", "--seed", "0"]) == 0
    summary = run_training(tiny_config(f"data.root={root}", "train.epochs=1", "data.batch_size=2"))
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and FITNESS in run.data.metrics
    assert run.data.params["data.train_split"] == "train" and run.data.params["data.val_split"] == "val"


def test_skip_policy_trains_on_a_broken_dataset_and_logs_counts(local_ray, tiny_config, synth_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    path = root / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["segmentation"] = [[10, 10, 20, 20, 30, 30]]
    coco["annotations"][1]["segmentation"] = []
    coco["annotations"][2]["bbox"] = [5, 5, 0, 3]
    path.write_text(json.dumps(coco))
    cfg = tiny_config(f"data.root={root}", "train.epochs=1", "data.on_invalid=skip")
    summary = run_training(cfg)
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["data/skipped_train_zero_area_mask"] == 1
    assert metrics["data/skipped_train_empty_segmentation"] == 1
    assert metrics["data/skipped_train_zero_area_box"] == 1
    assert run.data.params["data.on_invalid"] == "skip"
