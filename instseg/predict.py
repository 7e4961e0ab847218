"""Predict with a checkpoint, a bundle folder or a registered model -> COCO results JSON (RLE masks), and
optionally the images with the predictions drawn on them."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.io import ImageReadMode, decode_image, read_file

from instseg.data.coco import LabelMap
from instseg.data.files import atomic_path, atomic_write_json
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")  # what torchvision's decode_image reads
DRAW_SCORE = 0.25  # --save-images draws detections from this score (or --conf, if higher)


def expand_images(specs: Sequence[str]) -> list[Path]:
    """Image files, folders (their images, sorted) and glob patterns (sorted matches), in the order given."""
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InstsegError(f"no images in folder {spec} (looked for {', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise InstsegError(f"no files match {spec}")
            paths += found
        else:
            raise InstsegError(f"image not found: {spec}")
    return paths


def image_ids_from_annotations(paths: Sequence[Path], annotations: str | os.PathLike[str]) -> list[int]:
    """The id of each image in a COCO annotation file, found by file name (the name without folders too)."""
    from instseg.data.schema import read_json_file

    data = read_json_file(Path(annotations))
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InstsegError(f"--gt {annotations}: not a COCO annotation file (no 'images' list)")
    by_name: dict[str, int] = {}
    for image in images:
        name = str(image.get("file_name", ""))
        by_name.setdefault(name, int(image["id"]))
        by_name.setdefault(Path(name).name, int(image["id"]))
    missing = [p for p in paths if p.name not in by_name and str(p) not in by_name]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InstsegError(f"--gt {annotations}: no image with file_name {missing[0].name}{more}")
    return [by_name.get(str(p), by_name.get(p.name)) for p in paths]


def image_id_for(path: str | Path, position: int) -> int:
    """COCO file names are the image id (000000000036.jpg -> 36); other names get their 1-based position."""
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else position + 1


def load_image(path: str | Path) -> torch.Tensor:
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB).float().div_(255)
    except (RuntimeError, OSError) as exc:
        raise InstsegError(f"cannot read image {path}: {first_line(exc, 1000)}") from None


def decode_image_bytes(data: bytes, where: str) -> torch.Tensor:
    """An encoded image (JPEG, PNG, ...) given as bytes -> float RGB [3, H, W] in [0, 1]; `where` names it in errors."""
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_image(encoded, mode=ImageReadMode.RGB).float().div_(255)
    except (RuntimeError, ValueError) as exc:
        raise InstsegError(f"{where}: not an image torchvision can decode: {first_line(exc, 300)}") from None


@torch.inference_mode()
def detect(model: nn.Module, images: Sequence[torch.Tensor], conf: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """The model's output for each image (already on the model's device), detections below `conf` dropped."""
    return [{key: value[output["scores"] >= conf] for key, value in output.items()} for output in model(list(images))]


@torch.inference_mode()
def predict_paths(
    model: nn.Module,
    label_map: LabelMap,
    paths: Sequence[str | Path],
    image_ids: Sequence[int] | None = None,
    device: torch.device | None = None,
    batch_size: int = 4,
    conf: float = 0.0,
    draw_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """COCO results of `paths` (detections scoring at least `conf`); with `draw_dir`, each image with its
    detections drawn is written there under its own name (as PNG)."""
    device = device or torch.device("cpu")
    model.eval().to(device)
    ids = list(image_ids) if image_ids is not None else [image_id_for(p, i) for i, p in enumerate(paths)]
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [load_image(p).to(device) for p in chunk]
        outputs = detect(model, images, conf)
        for path, image, image_id, output in zip(chunk, images, ids[start : start + batch_size], outputs):
            results.extend(to_coco_results(int(image_id), output, label_map))
            if draw_dir is not None:
                draw_prediction(image, output, label_map, draw_dir / drawing_name(path), max(conf, DRAW_SCORE))
    return results


def drawing_name(path: str | Path) -> str:
    return f"{Path(path).stem}.png"


def check_drawing_folder(paths: Sequence[Path], draw_dir: Path) -> None:
    """--save-images writes only new files: never over a file of the user's, never two drawings to one name."""
    if draw_dir.exists() and not draw_dir.is_dir():
        raise InstsegError(f"--save-images {draw_dir}: that is a file, not a folder")
    seen: dict[str, Path] = {}
    for path in paths:
        name = drawing_name(path)
        if name in seen:
            raise InstsegError(f"--save-images: {seen[name]} and {path} would both be drawn as {name}")
        seen[name] = path
        if (draw_dir / name).exists():
            raise InstsegError(f"--save-images {draw_dir}: {name} is already there (give a new or empty folder)")


def draw_prediction(
    image: torch.Tensor, output: dict[str, torch.Tensor], label_map: LabelMap, path: Path, min_score: float
) -> Path:
    """The image at its own size and aspect ratio with masks, boxes, class names and scores, a colour per class."""
    from torchvision.io import write_png

    from instseg.metrics.plots import draw_detections, drawable

    pixels = image.mul(255).round().to(torch.uint8).cpu()
    drawn = draw_detections(pixels, drawable(output, min_score), list(label_map.names))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_png(drawn, str(tmp))
    return path


def resolve_bundle(model: str, workdir: Path) -> Path:
    """A bundle folder as it is, or a training checkpoint file or folder made into a bundle under `workdir`
    (models:/ and runs:/ are fetched first by instseg.tracking.model_source)."""
    path = Path(model)
    if path.is_dir() and is_bundle(path):
        return path
    if path.is_file() or (path / CHECKPOINT_FILE).is_file():
        return bundle_from_checkpoint(path, workdir / "bundle")
    raise InstsegError(f"model not found: {model} (give models:/NAME@alias, a bundle folder or a checkpoint)")


def load_model(model: str) -> tuple[nn.Module, LabelMap]:
    """The network and its classes from a bundle folder or a checkpoint."""
    with tempfile.TemporaryDirectory(prefix="instseg-model-") as tmp:
        net, label_map, _ = load_bundle(resolve_bundle(model, Path(tmp)))
    return net, label_map


def predict(
    model: str,
    images: Sequence[str],
    out: str | os.PathLike[str],
    device: str = "auto",
    batch_size: int = 4,
    conf: float = 0.0,
    gt: str | os.PathLike[str] | None = None,
    save_images: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Predict `images` (files, folders, globs) with `model` on `device` (see resolve_device), `batch_size`
    images per forward pass, keeping detections scoring at least `conf`. Image ids come from the COCO file `gt`
    by file name, else from the file names (image_id_for)."""
    target = resolve_device(device)
    if batch_size < 1:
        raise InstsegError(f"--batch {batch_size}: give at least 1")
    if not 0.0 <= conf <= 1.0:
        raise InstsegError(f"--conf {conf}: give a score between 0 and 1")
    paths = expand_images(images)
    image_ids = image_ids_from_annotations(paths, gt) if gt is not None else None
    net, label_map = load_model(model)
    draw_dir = Path(save_images) if save_images is not None else None
    if draw_dir is not None:
        check_drawing_folder(paths, draw_dir)
    results = predict_paths(net, label_map, paths, image_ids, target, batch_size, conf, draw_dir)
    out = Path(out)
    atomic_write_json(out, results)
    summary = {"images": len(paths), "detections": len(results), "out": str(out), "device": str(target)}
    if draw_dir is not None:
        summary["drawn"] = str(draw_dir)
    return summary
