"""The training and evaluation loops (torchvision references/detection engine.py, trimmed).

Both are plain PyTorch: Ray Train wraps the model and loader around them, the loops don't know.
"""

from __future__ import annotations

import math
import time
from typing import Iterable

import torch
from torch import nn

from instseg.engine.precision import Precision
from instseg.engine.progress import Progress
from instseg.errors import InstsegError
from instseg.metrics.coco_eval import CocoEvaluator
from instseg.metrics.names import TRAIN_LOSS, TRAIN_LOSS_KEYS, WORKER_THROUGHPUT, train_key

VALIDATION_SEED = 0  # the random sampling inside validation losses (see validation_loss)


class NonFiniteLossError(InstsegError):
    exit_code = 1


def batch_to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list, list]:
    """Move a batch; uint8 images (as datasets hand them over) become float [0, 1] on the device."""
    images = [image.to(device, non_blocking=True) for image in images]
    images = [image.float().div_(255) if image.dtype == torch.uint8 else image for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    log_every: int = 10,
    progress: Progress | None = None,
    precision: Precision | None = None,
    grad_clip_norm: float = 0.0,
) -> dict[str, float]:
    """One pass over `loader`; returns this process's mean of each Mask R-CNN loss, their sum, and its
    training throughput in images/s (data loading included).

    `scheduler` steps per iteration (warm-up + per-iteration decay); `precision` sets autocast and the
    fp16 loss scaler; `grad_clip_norm` > 0 clips the global gradient norm (after unscaling); `progress`
    hears of every step, and of the running loss every `log_every` steps (instseg.engine.progress).

    The loop itself does not make the host wait for the GPU each step (torchvision's references read the
    loss before every backward): the losses are summed on the device and read every `log_every` steps and at
    the end, which is also when a non-finite loss is caught. It stops the epoch before its checkpoint, so the
    few steps taken on NaN weights are never saved."""
    precision = precision or Precision(device.type)
    scaler = precision.scaler
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = images_seen = 0
    start = time.perf_counter()
    if progress is not None:
        progress.start(len(loader) if hasattr(loader, "__len__") else None)
    for images, targets in loader:
        images_seen += len(images)
        images, targets = batch_to_device(images, targets, device)
        with precision.autocast():
            loss_dict = model(images, targets)
        loss = sum(loss.float() for loss in loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for key, value in (*loss_dict.items(), ("loss", loss)):
            value = value.detach().float()
            sums[key] = sums[key] + value if key in sums else value
        steps += 1
        loss_read = _read_means(sums, steps)["loss"] if steps % log_every == 0 else None
        if progress is not None:
            progress.step(steps, images_seen, loss_read)
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - start
    means = _read_means(sums, steps) if steps else dict.fromkeys((*TRAIN_LOSS_KEYS, "loss"), 0.0)
    result = {train_key(key): value for key, value in means.items() if key != "loss"}
    result[TRAIN_LOSS] = means["loss"]
    result[WORKER_THROUGHPUT] = images_seen / elapsed if elapsed > 0 else 0.0
    return result


def _read_means(sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """The mean of each summed loss over `steps` (one host sync for all); NonFiniteLossError if any is not
    finite."""
    keys = list(sums)
    values = (torch.stack([sums[key] for key in keys]) / steps).tolist()
    means = dict(zip(keys, values))
    if not all(math.isfinite(value) for value in values):
        raise NonFiniteLossError(
            f"training loss is {means['loss']} by step {steps} "
            f"(means { {k: round(v, 4) for k, v in means.items() if k != 'loss'} }): lower train.lr or check the data"
        )
    return means


@torch.no_grad()
def validation_loss(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Mean Mask R-CNN losses on `loader` without changing the model: torchvision returns losses only in
    train mode, so the model runs in train mode with every BatchNorm in eval mode (running statistics
    are used, not updated: the v2 model's BatchNorm is trainable) and no gradients. Train mode samples
    anchors and proposals at random: that sampling draws from its own generator seeded with
    VALIDATION_SEED, so the same weights give the same losses whatever ran before (any rank, epoch or
    restart), and the training random stream is left where it was."""
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    sums: dict[str, float] = {}
    steps = 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(VALIDATION_SEED)
            for images, targets in loader:
                images, targets = batch_to_device(images, targets, device)
                for key, value in model(images, targets).items():
                    sums[key] = sums.get(key, 0.0) + value.item()
                steps += 1
    finally:
        model.train(was_training)
    means = {f"val/{key}": value / max(steps, 1) for key, value in sums.items()}
    means["val/loss"] = sum(means.values())
    return means


@torch.inference_mode()
def feed_predictions(model: nn.Module, loader: Iterable, device: torch.device, evaluator: CocoEvaluator) -> None:
    """Feed the predictions of `model` over `loader` to `evaluator` (reset first; eval mode, so
    BatchNorm statistics are untouched). Always in fp32: under bf16 autocast the class logits behind the
    detection scores are bf16, and their ties would reorder the ranking that COCO AP is computed from."""
    was_training = model.training
    model.eval()
    evaluator.reset()
    try:
        for images, targets in loader:
            images, _ = batch_to_device(images, [], device)
            evaluator.process(targets, model(images))
    finally:
        model.train(was_training)


def coco_metrics(
    model: nn.Module, loader: Iterable, device: torch.device, evaluator: CocoEvaluator
) -> dict[str, float]:
    """COCO bbox + segm metrics of `model` over `loader`, in one process."""
    feed_predictions(model, loader, device, evaluator)
    return evaluator.compute()
