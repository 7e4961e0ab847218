"""Plain helpers the tests share: paths, test-size overrides, the in-process training reference, subprocess
and MLflow waits (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from instseg.config import Config, ModelConfig, load, resolve_paths
from instseg.data.coco import CocoInstanceDataset
from instseg.data.loaders import build_loader
from instseg.engine.loops import train_one_epoch
from instseg.engine.optim import build_optimizer, build_scheduler
from instseg.metrics.names import EPOCH, FITNESS
from instseg.models import build_model
from instseg.tracking.runs import find_run

ROOT = Path(__file__).resolve().parents[1]


DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


# the CPU preset at test size: ~0.07 s per image per training step on one core
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


def isolated_overrides(data_root: Path, tmp_path: Path) -> list[str]:
    """The demo config at test size on `data_root`, with its MLflow store and Ray storage in tmp_path."""
    return [
        *TINY,
        f"data.root={data_root}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"ray.storage_path={tmp_path / 'ray_results'}",
    ]


def shared_dataset(name: str) -> Path:
    """A dataset under ../shared/datasets, or a skip naming where it was looked for."""
    path = shared_dir() / "datasets" / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name} not found at {path} (set INSTSEG_SHARED)")
    return path


OVERFIT_IMAGES = 8


OVERFIT_REPEATS = 10  # each image listed 10 times in the train split: 20 steps of 4 per epoch, few epochs (and reports)


# the learning tests' settings: 6 epochs x 20 steps = 120 optimizer steps, flips on (the demo config's default)
OVERFIT = ["train.epochs=6", "train.lr=0.001", "train.warmup_iters=10", "model.box_detections_per_img=50"]


OVERFIT_BAR = 0.8  # segm mAP50 on the images trained on


def train_in_process(cfg: Config, dataset_class: type[CocoInstanceDataset] = CocoInstanceDataset) -> torch.nn.Module:
    """cfg's training without Ray: the real dataset class (flips as configured), loader, optimizer, LR schedule
    and train_one_epoch, seeded as a Ray Train worker of rank 0 seeds itself."""
    torch.manual_seed(cfg.seed)
    dataset = dataset_class(cfg.data.root, cfg.data.train_split, hflip_prob=cfg.data.hflip_prob)
    model = build_model(cfg.model, dataset.label_map.num_classes)
    loader = build_loader(dataset, cfg.data, shuffle=True, seed=cfg.seed)
    optimizer = build_optimizer(model, cfg.train, lr=cfg.effective_lr())
    scheduler = build_scheduler(optimizer, cfg.train, len(loader))
    for epoch in range(cfg.train.epochs):
        loader.sampler.set_epoch(epoch)
        train_one_epoch(
            model, optimizer, loader, torch.device("cpu"), scheduler, grad_clip_norm=cfg.train.grad_clip_norm
        )
    return model.eval()


def overfit_config(root: Path, tmp_path: Path, *overrides: str) -> Config:
    return resolve_paths(load(DEMO_CONFIG, [*isolated_overrides(root, tmp_path), *OVERFIT, *overrides]))


RAY_CLI = str(Path(sys.executable).parent / "ray")


def ensure_auth_token() -> str:
    """The token in $HOME/.ray/auth_token (HOME is a temp dir in tests), created on first use."""
    done = subprocess.run([RAY_CLI, "get-auth-token", "--generate"], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


EPOCHS = 3


# keys whose history must be exactly one point per epoch
RAY_LOG_LINE = re.compile(r"^(\x1b\[\d+m)?\(")  # a line Ray forwarded from a worker or actor


PER_EPOCH_KEYS = (FITNESS, EPOCH, "train/loss", "val/segm_map", "val/loss", "train/lr")


def cli_overrides(data_root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        *isolated_overrides(data_root, tmp_path),
        f"train.epochs={EPOCHS}",
        "tracking.experiment=faults",
        *extra,
    ]


def wait_for_epoch(
    tracking_uri: str, run_name: str, epoch: int, timeout: float = 300, process: subprocess.Popen | None = None
) -> str:
    """Poll MLflow until run `run_name` has logged `epoch`; returns its run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"driver exited with {process.returncode} before epoch {epoch}:\n{process.stdout.read()}"
            )
        run = find_run(tracking_uri, "faults", run_name, kind="train")
        if run is not None and epoch in steps(tracking_uri, run.info.run_id, FITNESS):
            return run.info.run_id
        time.sleep(0.2)
    output = ""
    if process is not None:
        process.kill()
        output = process.communicate()[0][-4000:]
    raise AssertionError(f"run {run_name} did not log epoch {epoch} within {timeout} s\n{output}")


def steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def assert_one_point_per_epoch(tracking_uri: str, run_id: str, epochs: int = EPOCHS) -> None:
    for key in PER_EPOCH_KEYS:
        assert steps(tracking_uri, run_id, key) == list(range(1, epochs + 1)), key  # no gap, no duplicate


def finish(process: subprocess.Popen, timeout: float = 400) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"driver still running after {timeout} s:\n{output[-4000:]}")
    return output


BENCH = ROOT / "bench" / "gpu_train.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_train_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="tiny", weights="none", min_size=128, max_size=128), 81)


def files_containing(folder: Path, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]
