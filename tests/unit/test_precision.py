"""Mixed precision and speed knobs that must be safe on CPU: fp16 falls back, bf16 autocast trains, cuDNN
benchmark is refused with its reason."""

import pytest
import torch

from instseg.config import ModelConfig, TrainConfig, load
from instseg.data.coco import CocoInstanceDataset
from instseg.data.loaders import collate
from instseg.engine.loops import train_one_epoch
from instseg.engine.optim import build_optimizer, build_scheduler
from instseg.engine.precision import resolve_precision
from instseg.errors import ConfigError
from instseg.metrics.names import TRAIN_LOSS, WORKER_THROUGHPUT
from instseg.models import build_model
from tests.helpers import DEMO_CONFIG

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


def test_amp_off_unquoted_is_off():
    assert load(DEMO_CONFIG, ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        load(DEMO_CONFIG, ["train.amp=fp8"])


def test_cudnn_benchmark_is_refused_with_the_measured_reason():
    with pytest.raises(ConfigError, match=r"train.cudnn_benchmark.*2.2x slower.*RoI heads change shape"):
        load(DEMO_CONFIG, ["train.cudnn_benchmark=true"])
    assert load(DEMO_CONFIG, ["train.cudnn_benchmark=false"]).train.cudnn_benchmark is False
