"""`mlflow models serve` of a registered champion, started on 127.0.0.1: an image sent as base64 over HTTP comes
back as COCO results with RLE masks, boxes, labels and scores; bad input is a 400 that says what is wrong."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from pycocotools import mask as mask_utils

from instseg.data.coco import CocoInstanceDataset
from instseg.models import build_model
from instseg.models.bundle import write_bundle
from instseg.tracking.registry import CHAMPION, register_bundle
from instseg.tracking.runs import create_run
from tests.helpers import overfit_config
from tests.servers import free_port

pytestmark = pytest.mark.integration

MLFLOW_CLI = str(Path(sys.executable).parent / "mlflow")


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


@pytest.fixture
def served_champion(overfit_root, overfit_weights, tmp_path):
    """The overfit tiny model registered as `served` (its champion), and `mlflow models serve` of it."""
    cfg = overfit_config(overfit_root, tmp_path)
    label_map = CocoInstanceDataset(overfit_root, "val").label_map
    model = build_model(cfg.model, label_map.num_classes)
    model.load_state_dict(torch.load(overfit_weights, weights_only=True))
    bundle = write_bundle(tmp_path / "bundle", model.state_dict(), cfg.model.model_dump(), label_map.to_dict())
    uri = cfg.tracking.uri
    version = register_bundle(uri, create_run(uri, "serve", run_name="trained"), bundle, "served")
    MlflowClient(uri).set_registered_model_alias("served", CHAMPION, version)

    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    server = subprocess.Popen(
        [
            MLFLOW_CLI,
            "models",
            "serve",
            "-m",
            f"models:/served@{CHAMPION}",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not come up:\n{server.stdout.read()[-4000:]}")
            time.sleep(1)
        yield url, overfit_root, label_map
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the CLI and the uvicorn worker it started
        server.wait(timeout=60)


def test_the_served_champion_answers_a_base64_image_with_rle_masks(served_champion):
    url, root, label_map = served_champion
    dataset = CocoInstanceDataset(root, "val")
    image_id = dataset.image_ids[0]
    info = dataset.coco.imgs[image_id]
    encoded = base64.b64encode((root / "images" / "val" / info["file_name"]).read_bytes()).decode("ascii")

    status, answer = post(
        f"{url}/invocations", {"dataframe_records": [{"image": encoded, "image_id": image_id}], "params": {"conf": 0.5}}
    )
    assert status == 200, answer
    detections = answer["predictions"]
    assert detections and {d["image_id"] for d in detections} == {image_id}
    assert all(d["score"] >= 0.5 and len(d["bbox"]) == 4 and d["category"] in label_map.names for d in detections)
    # every ground-truth instance of the image is found by a mask of its class (the model was trained on it)
    for truth in dataset.coco.imgToAnns[image_id]:
        truth_mask = dataset.coco.annToMask(truth)
        best = 0.0
        for found in (d for d in detections if d["category_id"] == truth["category_id"]):
            assert found["segmentation"]["size"] == [info["height"], info["width"]]
            rle = {"size": found["segmentation"]["size"], "counts": found["segmentation"]["counts"].encode()}
            mask = mask_utils.decode(rle)
            best = max(best, np.logical_and(mask, truth_mask).sum() / np.logical_or(mask, truth_mask).sum())
        assert best > 0.5, (truth["id"], best)

    status, answer = post(f"{url}/invocations", {"dataframe_records": [{"image": "not an image!"}]})
    assert status == 400 and "'image' is not base64" in answer["message"]
    status, answer = post(f"{url}/invocations", {"dataframe_records": [{"path": "/etc/passwd"}]})
    assert status == 400  # a server-side path is not an input: the signature wants the image itself
