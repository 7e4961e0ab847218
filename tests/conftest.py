"""Shared fixtures: isolated HOME / Ray / MLflow / Prefect state, synthetic data, tiny-model overrides."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from instseg.config import Config, load, resolve_paths
from instseg.data.formats import annotation_path
from instseg.data.synth import synthesize
from tests.helpers import (
    DEMO_CONFIG,
    OVERFIT_IMAGES,
    OVERFIT_REPEATS,
    isolated_overrides,
    overfit_config,
    train_in_process,
)

# Ray binds and dials the machine's own interface address unless this is "0" (its single-machine mode,
# read at import): then every node, driver and connection of the tests stays on 127.0.0.1
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


_ISOLATED_ENV = {
    "HOME",
    "RAY_AUTH_MODE",
    "PREFECT_HOME",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    LOOPBACK_ONLY,
}
_saved_env: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module imports ray (which caches RAY_AUTH_MODE at import): HOME, so Ray's
    auth token and Prefect's home, in a temp dir; Ray token auth on, as on new clusters; Ray on loopback."""
    home = Path(tempfile.mkdtemp(prefix="instseg-test-home-"))
    _saved_env.update({key: os.environ.get(key) for key in _ISOLATED_ENV})
    os.environ.update(
        {
            "HOME": str(home),
            "RAY_AUTH_MODE": "token",
            "PREFECT_HOME": str(home / ".prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            LOOPBACK_ONLY: "0",
        }
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    home = os.environ.get("HOME", "")
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if Path(home).name.startswith("instseg-test-home-"):
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    synthesize(root, images=16, seed=0)
    return root


@pytest.fixture
def tiny_config(synth_root: Path, tmp_path: Path):
    """A factory: the demo config at test size, with its own MLflow store and Ray storage."""

    def make(*overrides: str) -> Config:
        return resolve_paths(load(DEMO_CONFIG, [*isolated_overrides(synth_root, tmp_path), *overrides]))

    return make


@pytest.fixture(scope="session")
def overfit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OVERFIT_IMAGES synthetic images as the val split and, each listed OVERFIT_REPEATS times under new ids, as
    the train split: a model that learns scores high on val, one whose targets are wired wrong does not."""
    root = tmp_path_factory.mktemp("data") / "overfit"
    synthesize(root, images=10, seed=1)  # 8 train + 2 val
    train = json.loads(annotation_path(root, "train").read_text())
    assert len(train["images"]) == OVERFIT_IMAGES
    shutil.rmtree(root / "images" / "val")
    shutil.copytree(root / "images" / "train", root / "images" / "val")
    annotation_path(root, "val").write_text(json.dumps(train))
    repeated = {**train, "images": [], "annotations": []}
    for copy in range(OVERFIT_REPEATS):
        repeated["images"] += [{**image, "id": image["id"] + 1000 * copy} for image in train["images"]]
        repeated["annotations"] += [
            {**ann, "id": ann["id"] + 100_000 * copy, "image_id": ann["image_id"] + 1000 * copy}
            for ann in train["annotations"]
        ]
    annotation_path(root, "train").write_text(json.dumps(repeated))
    return root


@pytest.fixture(scope="session")
def overfit_weights(overfit_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's state dict after the OVERFIT training on overfit_root, in this process
    (tests/unit/test_learning.py holds it to its bar; evaluation tests use it as a model that detects)."""
    tmp = tmp_path_factory.mktemp("overfit-weights")
    torch.save(train_in_process(overfit_config(overfit_root, tmp)).state_dict(), tmp / "tiny.pt")
    return tmp / "tiny.pt"
