"""Checkpoint files: plain tensors and builtins only, so they load with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    config: dict[str, Any],
    label_map: dict[str, Any],
    metrics: dict[str, float],
    early_stopping: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None,
) -> Path:
    """Everything a resumed run needs: `epoch` is the number of completed epochs, config is
    Config.model_dump(), label_map LabelMap.to_dict(), metrics the epoch's reported metrics."""
    path = folder / CHECKPOINT_FILE
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "config": config,
            "label_map": label_map,
            "metrics": metrics,
            "early_stopping": early_stopping or {},
            "scaler": scaler or {},  # fp16 GradScaler state ({} without fp16)
        },
        path,
    )
    return path


def load_checkpoint(folder_or_file: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=True)
