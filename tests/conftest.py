"""Shared fixtures: isolated HOME / Ray / MLflow / Prefect state, synthetic data, tiny-model overrides."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from instseg.config import Config, load, resolve_paths
from instseg.data.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
# Ray binds and dials the machine's own interface address unless this is "0" (its single-machine mode,
# read at import): then every node, driver and connection of the tests stays on 127.0.0.1
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
# the CPU preset at test size: ~0.15 s per image per step on 2 cores
TINY = [
    "model.arch=tiny",
    "model.weights=none",
    "model.min_size=128",
    "model.max_size=160",
    "model.box_score_thresh=0.0",
    "model.box_detections_per_img=30",
    "data.batch_size=4",
    "train.warmup_iters=2",
]


def shared_dir() -> Path:
    """../shared beside the project, or INSTSEG_SHARED."""
    return Path(os.environ.get("INSTSEG_SHARED", ROOT.parent / "shared"))


_ISOLATED_ENV = {"HOME", "RAY_AUTH_MODE", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_TRACKING_URI", "RAY_ADDRESS",
                 LOOPBACK_ONLY}
_saved_env: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module imports ray (which caches RAY_AUTH_MODE at import): HOME, so Ray's
    auth token and Prefect's home, in a temp dir; Ray token auth on, as on new clusters; Ray on loopback."""
    home = Path(tempfile.mkdtemp(prefix="instseg-test-home-"))
    _saved_env.update({key: os.environ.get(key) for key in _ISOLATED_ENV})
    os.environ.update(
        {"HOME": str(home), "RAY_AUTH_MODE": "token", "PREFECT_HOME": str(home / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         LOOPBACK_ONLY: "0"}
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


def isolated_overrides(data_root: Path, tmp_path: Path) -> list[str]:
    """The demo config at test size on `data_root`, with its MLflow store and Ray storage in tmp_path."""
    return [
        *TINY,
        f"data.root={data_root}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"ray.storage_path={tmp_path / 'ray_results'}",
    ]


@pytest.fixture
def tiny_config(synth_root: Path, tmp_path: Path):
    """A factory: the demo config at test size, with its own MLflow store and Ray storage."""

    def make(*overrides: str) -> Config:
        return resolve_paths(load(DEMO_CONFIG, [*isolated_overrides(synth_root, tmp_path), *overrides]))

    return make


def shared_dataset(name: str) -> Path:
    """A dataset under ../shared/datasets, or a skip naming where it was looked for."""
    path = shared_dir() / "datasets" / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name} not found at {path} (set INSTSEG_SHARED)")
    return path
