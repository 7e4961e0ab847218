"""A model bundle: the form in which a trained model leaves training (registry, predict).

    FOLDER/weights.pt   the model state dict: tensors only, loaded with weights_only=True
    FOLDER/model.json   {"model": ModelConfig, "label_map": LabelMap, "metrics": {...}}

Nothing in a bundle needs unpickling Python objects to load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instseg.config import WEIGHT_KEYS, ModelConfig
from instseg.data.coco import LabelMap
from instseg.data.files import atomic_write_json
from instseg.data.schema import read_json_file
from instseg.engine.checkpoint import atomic_torch_save, load_checkpoint
from instseg.errors import InstsegError, first_line
from instseg.models.factory import build_model
from instseg.models.weights import load_state_dict_file

WEIGHTS_FILE = "weights.pt"
META_FILE = "model.json"


def write_bundle(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    model_cfg: dict[str, Any],
    label_map: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state_dict, folder / WEIGHTS_FILE)
    # the architecture only: the weights are in the bundle, nothing is fetched or loaded from elsewhere
    architecture = {**model_cfg, **dict.fromkeys(WEIGHT_KEYS, "none")}
    meta = {"model": architecture, "label_map": label_map, "metrics": metrics or {}}
    atomic_write_json(folder / META_FILE, meta, indent=2)
    return folder


def bundle_from_checkpoint(checkpoint: str | os.PathLike[str], folder: Path) -> Path:
    """A training checkpoint (model + optimizer + ...) -> a bundle with the weights only."""
    state = load_checkpoint(checkpoint)
    return write_bundle(folder, state["model"], state["config"]["model"], state["label_map"], state.get("metrics"))


def is_bundle(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / META_FILE).is_file()


def load_bundle(folder: str | os.PathLike[str]) -> tuple[nn.Module, LabelMap, dict[str, Any]]:
    """(model in eval mode, label map, metadata) from a bundle folder."""
    folder = Path(folder)
    if not is_bundle(folder):
        raise InstsegError(f"{folder} is not a model bundle (needs {WEIGHTS_FILE} and {META_FILE})")
    meta = read_json_file(folder / META_FILE)
    try:
        label_map = LabelMap.from_dict(meta["label_map"])
        model_cfg = ModelConfig.model_validate(meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        reason = first_line(exc, 1000)
        raise InstsegError(f"{folder / META_FILE}: not a bundle's model description ({reason})") from None
    model = build_model(model_cfg, label_map.num_classes)
    try:
        model.load_state_dict(load_state_dict_file(folder / WEIGHTS_FILE))
    except RuntimeError as exc:
        reason = first_line(exc, 1000)
        raise InstsegError(f"{folder / WEIGHTS_FILE} does not fit the model in {META_FILE}: {reason}") from None
    return model.eval(), label_map, meta
