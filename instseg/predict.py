"""Predict with a checkpoint, a bundle folder or a registered model -> COCO results JSON (RLE masks)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.io import ImageReadMode, decode_image, read_file

from instseg.data.coco import LabelMap
from instseg.data.files import atomic_write_json
from instseg.engine.checkpoint import CHECKPOINT_FILE
from instseg.errors import InstsegError, first_line
from instseg.metrics.coco_eval import to_coco_results
from instseg.models.bundle import bundle_from_checkpoint, is_bundle, load_bundle


def resolve_device(spec: str) -> torch.device:
    """--device: auto (the first GPU if there is one, else the CPU), cpu, cuda or cuda:N."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InstsegError(f"--device {spec}: give auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InstsegError(f"--device {spec}: give auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise InstsegError(f"--device {spec}: this machine has no CUDA device (use --device cpu or auto)")
        if device.index is not None and device.index >= count:
            raise InstsegError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def image_id_for(path: str | Path, position: int) -> int:
    """COCO file names are the image id (000000000036.jpg -> 36); other names get their 1-based position."""
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else position + 1


def load_image(path: str | Path) -> torch.Tensor:
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB).float().div_(255)
    except (RuntimeError, OSError) as exc:
        raise InstsegError(f"cannot read image {path}: {first_line(exc, 1000)}") from None


@torch.inference_mode()
def predict_paths(
    model: nn.Module,
    label_map: LabelMap,
    paths: Sequence[str | Path],
    image_ids: Sequence[int] | None = None,
    device: torch.device | None = None,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    device = device or torch.device("cpu")
    model.eval().to(device)
    ids = list(image_ids) if image_ids is not None else [image_id_for(p, i) for i, p in enumerate(paths)]
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        outputs = model([load_image(p).to(device) for p in chunk])
        for image_id, output in zip(ids[start : start + batch_size], outputs):
            results.extend(to_coco_results(int(image_id), output, label_map))
    return results


def resolve_bundle(model: str, workdir: Path, tracking_uri: str | None = None) -> Path:
    """models:/..., runs:/... (registry), a bundle folder, or a training checkpoint file or folder."""
    if model.startswith(("models:/", "runs:/")):
        from instseg.tracking.registry import download_bundle
        from instseg.tracking.runs import resolve_tracking_uri

        return download_bundle(resolve_tracking_uri(tracking_uri), model, workdir / "registry")
    path = Path(model)
    if path.is_dir() and is_bundle(path):
        return path
    if path.is_file() or (path / CHECKPOINT_FILE).is_file():
        return bundle_from_checkpoint(path, workdir / "bundle")
    raise InstsegError(f"model not found: {model} (give models:/NAME@alias, a bundle folder or a checkpoint)")


def predict(
    model: str,
    images: Sequence[str],
    out: str | os.PathLike[str],
    tracking_uri: str | None = None,
    device: str = "auto",
    batch_size: int = 4,
) -> dict[str, Any]:
    """Predict `images` with `model` on `device` (see resolve_device), `batch_size` images per forward pass."""
    target = resolve_device(device)
    if batch_size < 1:
        raise InstsegError(f"--batch {batch_size}: give at least 1")
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise InstsegError(f"image not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    with tempfile.TemporaryDirectory(prefix="instseg-predict-") as tmp:
        net, label_map, _ = load_bundle(resolve_bundle(model, Path(tmp), tracking_uri))
    results = predict_paths(net, label_map, images, device=target, batch_size=batch_size)
    out = Path(out)
    atomic_write_json(out, results)
    return {"images": len(images), "detections": len(results), "out": str(out), "device": str(target)}
