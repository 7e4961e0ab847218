"""Speed knobs that must be safe on CPU, the linear LR rule, checkpoint contents, and the job helper's parsing."""

import json

import pytest
import torch

from instseg.config import ModelConfig, TrainConfig, load
from instseg.data.coco import CocoInstanceDataset
from instseg.data.loaders import collate
from instseg.engine.checkpoint import load_checkpoint, save_checkpoint
from instseg.engine.loops import train_one_epoch
from instseg.engine.optim import build_optimizer, build_scheduler
from instseg.engine.precision import resolve_precision
from instseg.errors import ConfigError
from instseg.metrics.names import TRAIN_LOSS, WORKER_THROUGHPUT
from instseg.models import build_model
from ray_jobs.submit import RESULT_MARKER, load_runtime_env, parse_logs
from tests.conftest import DEMO_CONFIG

CPU = torch.device("cpu")


def test_fp16_on_cpu_falls_back_to_fp32_and_says_so():
    said = []
    precision = resolve_precision("fp16", CPU, warn=said.append)
    assert precision.dtype is None and precision.scaler is None and "fp32" in said[0]
    assert resolve_precision("bf16", CPU).dtype is torch.bfloat16
    assert resolve_precision("off", CPU).scaler_state() == {}


def test_train_step_with_bf16_autocast_and_clipping_runs_on_cpu(synth_root):
    torch.manual_seed(0)
    dataset = CocoInstanceDataset(synth_root, "train")
    model = build_model(
        ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160), dataset.label_map.num_classes
    )
    train = TrainConfig(lr=0.01, warmup_iters=0, grad_clip_norm=0.5, weight_decay=0.0)
    optimizer = build_optimizer(model, train)
    batches = [collate([dataset[0], dataset[1]])]
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    metrics = train_one_epoch(
        model,
        optimizer,
        batches,
        CPU,
        build_scheduler(optimizer, train, 1),
        precision=resolve_precision("bf16", CPU),
        grad_clip_norm=train.grad_clip_norm,
    )
    assert metrics[TRAIN_LOSS] > 0 and metrics[WORKER_THROUGHPUT] > 0
    after = [p for p in model.parameters() if p.requires_grad]
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before)))
    assert 0 < moved <= 0.01 * 0.5 * 1.0001, "one SGD step of a gradient clipped to norm 0.5 at lr 0.01"


def test_learning_rate_scales_linearly_with_the_global_batch():
    cfg = load(DEMO_CONFIG, ["train.lr=0.02", "data.batch_size=4", "ray.num_workers=4"])
    assert cfg.global_batch() == 16 and cfg.effective_lr() == pytest.approx(0.08)
    cfg = load(DEMO_CONFIG, ["train.lr=0.02", "data.batch_size=2", "ray.num_workers=8", "train.lr_reference_batch=16"])
    assert cfg.effective_lr() == pytest.approx(0.02)  # torchvision's recipe: 0.02 for 8 GPUs x 2 images


def test_amp_off_unquoted_is_off():
    assert load(DEMO_CONFIG, ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        load(DEMO_CONFIG, ["train.amp=fp8"])


def test_sync_batchnorm_without_gpus_is_a_config_error():
    with pytest.raises(ConfigError, match="model.sync_batchnorm needs ray.use_gpu=true"):
        load(DEMO_CONFIG, ["model.sync_batchnorm=true"])


def test_checkpoint_holds_everything_a_resume_needs(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(
        tmp_path,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=3,
        config={"seed": 0},
        label_map={"names": ["a"]},
        metrics={"fitness": 0.5},
        early_stopping={"best": 0.5},
        scaler={"scale": 1024.0},
        results=[{"epoch": 1, "train/loss": 2.0}, {"epoch": 2, "train/loss": 1.5}],
    )
    state = load_checkpoint(tmp_path)  # weights_only=True: plain tensors and builtins only
    assert state["epoch"] == 3 and state["scaler"] == {"scale": 1024.0} and state["early_stopping"] == {"best": 0.5}
    assert state["results"] == [{"epoch": 1, "train/loss": 2.0}, {"epoch": 2, "train/loss": 1.5}]
    assert set(state) == {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "config",
        "label_map",
        "metrics",
        "early_stopping",
        "scaler",
        "results",
    }


def test_job_logs_give_the_run_id_and_the_summary():
    logs = (
        "started MLflow run "
        + "a" * 32
        + " 'x'\nepoch 1/1 ...\n"
        + RESULT_MARKER
        + json.dumps({"run_id": "b" * 32, "metrics": {}})
        + "\n"
    )
    assert parse_logs(logs) == ("b" * 32, {"run_id": "b" * 32, "metrics": {}})
    assert parse_logs("resuming MLflow run " + "c" * 32 + " 'x'\nTraceback ...") == ("c" * 32, None)  # a failed job
    assert parse_logs("nothing") == (None, None)


def test_runtime_env_file_gets_an_absolute_working_dir(tmp_path, monkeypatch):
    (tmp_path / "env.yaml").write_text("working_dir: .\nexcludes: [data]\n")
    monkeypatch.chdir(tmp_path)
    assert load_runtime_env("env.yaml", None) == {"working_dir": str(tmp_path), "excludes": ["data"]}
    with pytest.raises(ConfigError, match="runtime env file not found"):
        load_runtime_env("missing.yaml", None)


def test_cudnn_benchmark_is_refused_with_the_measured_reason():
    with pytest.raises(ConfigError, match=r"train.cudnn_benchmark.*2.2x slower.*RoI heads change shape"):
        load(DEMO_CONFIG, ["train.cudnn_benchmark=true"])
    assert load(DEMO_CONFIG, ["train.cudnn_benchmark=false"]).train.cudnn_benchmark is False


def test_trials_share_a_gpu_through_fractional_gpus_per_worker():
    from ray_jobs.trainer import scaling_config

    cfg = load(DEMO_CONFIG, ["ray.use_gpu=true", "ray.gpus_per_worker=0.25", "ray.cpus_per_worker=2"])
    scaling = scaling_config(cfg)
    assert scaling.use_gpu and scaling.num_workers == 1
    assert scaling.resources_per_worker == {"CPU": 2.0, "GPU": 0.25}
    assert scaling_config(load(DEMO_CONFIG, [])).resources_per_worker == {"CPU": 0.9}, "no GPU asked for on CPU"
    with pytest.raises(ConfigError, match=r"gpus_per_worker=0.5 puts several workers on one GPU"):
        load(DEMO_CONFIG, ["ray.use_gpu=true", "ray.gpus_per_worker=0.5", "ray.num_workers=2"])
    with pytest.raises(ConfigError, match="ray.gpus_per_worker"):
        load(DEMO_CONFIG, ["ray.gpus_per_worker=2"])
