"""Optimizer and per-iteration LR schedule from TrainConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from instseg.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """`lr` overrides cfg.lr (Config.effective_lr: scaled to the global batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_iters`, then cosine decay to 1% (or constant) until the last epoch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(cfg.warmup_iters, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.001 + (1 - 0.001) * step / warmup
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, lr: float
) -> None:
    """After loading a checkpoint's optimizer and schedule: the configured base `lr`, weight decay and momentum
    replace the stored ones, at the same point of the schedule. A no-op when they are the checkpoint's own; PBT
    changes them when a trial continues from another trial's checkpoint."""
    for group, stored_base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] *= lr / stored_base
        group["initial_lr"] = lr
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
