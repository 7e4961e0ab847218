"""Where model weights come from, and how a file is fitted into a model.

Sources for `model.weights` / `model.backbone_weights`:
    DEFAULT   torchvision's published file for the architecture (COCO Mask R-CNN for the R50 models, the
              ImageNet backbone for tiny and for backbone_weights), read from torch hub's cache
              ($TORCH_HOME/hub/checkpoints/<file name>) and downloaded into it only when absent
    a path    a state dict: torchvision's official file, an instseg checkpoint or bundle weights

Every file is loaded with weights_only=True. Machines without internet (clusters often are) get one line
naming the exact file, where to put it and how to fetch it elsewhere; INSTSEG_OFFLINE=1 never tries.
"""

from __future__ import annotations

import os
import re
import urllib.error
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models.detection import (
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
)

from instseg.config import WEIGHT_KEYS, ModelConfig
from instseg.errors import ConfigError, first_line

OFFLINE_ENV = "INSTSEG_OFFLINE"
# the class-specific layers: re-initialised when a file was trained for another number of classes
CLASS_HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
_LISTED_KEYS = 4  # keys named in an error before "and N more"

# torchvision's published weights (the detection builders' choices: COCO_V1 models, IMAGENET1K_V1 backbones)
PUBLISHED_MODEL = {
    "maskrcnn_resnet50_fpn_v2": MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
    "maskrcnn_resnet50_fpn": MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
}
PUBLISHED_BACKBONE = {
    "maskrcnn_resnet50_fpn_v2": ResNet50_Weights.IMAGENET1K_V1,
    "maskrcnn_resnet50_fpn": ResNet50_Weights.IMAGENET1K_V1,
    "tiny": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}


def published(arch: str, key: str) -> tuple[WeightsEnum, bool]:
    """The file DEFAULT means for `model.<key>` of `arch`, and whether it holds a whole model (else a backbone).
    No tiny Mask R-CNN is published: tiny's DEFAULT is its ImageNet backbone."""
    if key == "weights" and arch in PUBLISHED_MODEL:
        return PUBLISHED_MODEL[arch], True
    return PUBLISHED_BACKBONE[arch], False


def check_weights_available(model: ModelConfig) -> None:
    """In the driver, before workers start: the files a run will load exist (published ones are fetched into
    torch hub's cache now), so a missing file stops with one line instead of failing in every worker."""
    for key in WEIGHT_KEYS:
        value = getattr(model, key)
        if is_default(value):
            ensure_published(published(model.arch, key)[0], f"model.{key}")
        elif not is_none(value) and not Path(value).is_file():
            raise ConfigError(f"model.{key}: file not found: {value}")
        elif not is_none(value):
            load_state_dict_file(value)  # a file that is not a state dict fails here, not in every worker


def is_none(value: str) -> bool:
    return value.upper() == "NONE"


def is_default(value: str) -> bool:
    return value.upper() == "DEFAULT"


def hub_file(weights: WeightsEnum) -> Path:
    """Where torchvision looks for (and downloads) a published file: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pt/.pth file: plain tensors only (weights_only=True never runs pickled code)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"weights file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 (torch raises several kinds for a file that is not a tensor file)
        raise ConfigError(f"{path}: not a readable state dict ({first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # an instseg training checkpoint
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return state


def offline_message(weights: WeightsEnum, key: str, reason: str) -> str:
    path = hub_file(weights)
    return (
        f"{key}=DEFAULT needs torchvision's file {path.name} ({weights}) at {path}, and it could not be downloaded "
        f"({reason}). On a machine with internet run `curl -L -o {path.name} {weights.url}`, copy the file to "
        f"{path.parent}/ here (TORCH_HOME moves that folder), or set {key} to its path"
    )


def ensure_published(weights: WeightsEnum, key: str) -> Path:
    """The published file in torch hub's cache, downloaded (hash-checked) into it when absent; without a
    network (or with INSTSEG_OFFLINE=1) a ConfigError that says which file to bring and where."""
    path = hub_file(weights)
    if path.is_file():
        return path
    if os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes"):
        raise ConfigError(offline_message(weights, key, f"{OFFLINE_ENV} is set"))
    match = re.search(r"-([a-f0-9]+)\.", path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=match.group(1) if match else None)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:  # RuntimeError: hash mismatch
        raise ConfigError(offline_message(weights, key, first_line(exc))) from None
    return path


def load_published(weights: WeightsEnum, key: str) -> dict[str, torch.Tensor]:
    return load_state_dict_file(ensure_published(weights, key))


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else ""
    return ", ".join(keys[:_LISTED_KEYS]) + more


def _counted(key: str) -> bool:
    """BatchNorm's step counter is not a weight: files saved with FrozenBatchNorm have none."""
    return not key.endswith("num_batches_tracked")


def fit_model_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load a whole-model state dict into `model`. Class-specific head layers whose shape differs (a COCO
    file, 91 classes, into a model for the dataset's classes) keep their fresh initialisation; any other
    missing, unexpected or differently shaped key is a ConfigError naming them. Returns the re-initialised keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and _counted(k)]
    unexpected = [k for k in state if k not in own and _counted(k)]
    if missing or unexpected:
        parts = [
            f"missing keys {_listed(missing)}" if missing else "",
            f"unexpected keys {_listed(unexpected)}" if unexpected else "",
        ]
        hint = ""
        if "fc.weight" in state or any(k.startswith("classifier.") for k in state):
            hint = " (a classification network's file: set it as model.backbone_weights)"
        raise ConfigError(f"{source} does not fit this model: {'; '.join(p for p in parts if p)}{hint}")
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    reinitialised = [k for k in mismatched if k.startswith(CLASS_HEAD_PREFIXES)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if k not in reinitialised]
    if wrong:
        raise ConfigError(f"{source} does not fit this model: shapes differ for {_listed(wrong)}")
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in reinitialised}, strict=False)
    return reinitialised


def fit_backbone_weights(body: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a classification network's state dict (ImageNet ResNet-50 or MobileNetV3) into the detection
    backbone's body: its classifier and any layer the body does not use are ignored; a body key the file
    lacks is a ConfigError naming it. MobileNet files name their layers `features.N...`, the body `N...`."""
    own = [k for k in body.state_dict() if _counted(k)]
    prefix = "features." if own and own[0] not in state and f"features.{own[0]}" in state else ""
    missing = [k for k in own if prefix + k not in state]
    if missing:
        raise ConfigError(f"{source} does not fit the backbone: missing keys {_listed([prefix + k for k in missing])}")
    shapes = body.state_dict()
    wrong = [
        f"{prefix + k} {tuple(state[prefix + k].shape)} vs {tuple(shapes[k].shape)}"
        for k in own
        if state[prefix + k].shape != shapes[k].shape
    ]
    if wrong:
        raise ConfigError(f"{source} does not fit the backbone: shapes differ for {_listed(wrong)}")
    body.load_state_dict({k: state[prefix + k] for k in own}, strict=False)
