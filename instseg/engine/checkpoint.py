"""Checkpoint files: plain tensors and builtins only, so they load with weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from instseg.data.files import atomic_path
from instseg.errors import InstsegError, first_line

CHECKPOINT_FILE = "checkpoint.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
    results: list[dict[str, float]] | None = None,
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
            "results": results or [],  # the reported metrics of every epoch so far (results.csv, loss plots)
        },
        path,
    )
    return path


def load_checkpoint(folder_or_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The state a training run saved; InstsegError for a file that is not one (or would need unpickling
    arbitrary objects: weights_only refuses those)."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InstsegError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 (torch raises many kinds for a file that is not a checkpoint)
        raise InstsegError(f"{path}: not a checkpoint that loads safely (weights_only): {first_line(exc)}") from None
    if not isinstance(state, dict) or not {"model", "config", "label_map"} <= set(state):
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InstsegError(
                f"{path} holds model weights only (a bundle's weights.pt?): give the bundle folder {path.parent}"
            )
        raise InstsegError(f"{path}: not a training checkpoint (needs 'model', 'config' and 'label_map')")
    return state
