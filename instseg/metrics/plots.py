"""Plots of evaluation results (matplotlib, Agg backend chosen at call time: nothing happens at import)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from instseg.data.files import atomic_path
from instseg.metrics.detection import ClassCurves, ConfusionMatrix


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> Path:
    """Written whole or not at all (temp file + rename), then closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    _pyplot().close(fig)
    return path


def plot_confusion_matrix(matrix: ConfusionMatrix, names: list[str], out: Path) -> list[Path]:
    plt = _pyplot()
    labels = [*names, "background"]
    paths = []
    for normalize, name in ((False, "confusion_matrix.png"), (True, "confusion_matrix_normalized.png")):
        values = matrix.normalized() if normalize else matrix.matrix
        size = max(6, 0.35 * len(labels))
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        image = ax.imshow(values, cmap="Blues")
        ticks = range(len(labels)) if len(labels) <= 40 else []
        ax.set_xticks(list(ticks), [labels[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(list(ticks), [labels[i] for i in ticks], fontsize=7)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.set_title(f"confusion matrix{' (normalised by true class)' if normalize else ''}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        paths.append(_save_figure(fig, out / name))
    return paths


def plot_curves(curves: ClassCurves, names: list[str], out: Path) -> list[Path]:
    """PR (IoU 0.5) and P / R / F1 against confidence: each class thin, the mean bold."""
    plt = _pyplot()
    x = curves.confidence
    specs = (
        ("PR_curve.png", curves.pr_curve, "recall", "precision", f"mAP50 {curves.ap[:, 0].mean() if len(curves.classes) else 0:.3f}"),
        ("P_curve.png", curves.p_curve, "confidence", "precision", ""),
        ("R_curve.png", curves.r_curve, "confidence", "recall", ""),
        ("F1_curve.png", curves.f1_curve, "confidence", "F1", f"best {curves.f1_curve.mean(0).max() if len(curves.classes) else 0:.3f} at {curves.best_confidence:.3f}"),
    )
    paths = []
    for file_name, values, xlabel, ylabel, note in specs:
        fig, ax = plt.subplots(figsize=(7, 5))
        for row, cls in zip(values, curves.classes):
            ax.plot(x, row, linewidth=0.8, label=names[int(cls)] if len(curves.classes) <= 15 else None)
        if len(curves.classes):
            ax.plot(x, values.mean(0), linewidth=2.5, color="blue", label=f"all classes {note}".strip())
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        paths.append(_save_figure(fig, out / file_name))
    return paths


def plot_losses(history: dict[str, list[tuple[int, float]]], out: Path) -> Path:
    """Train and validation losses per epoch (history: metric -> [(epoch, value)])."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, points in sorted(history.items()):
        if points:
            epochs, values = zip(*sorted(points))
            ax.plot(epochs, values, marker="o", linewidth=2 if key.endswith("/loss") else 0.8, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, out / "loss_curves.png")


def _palette() -> list[tuple[int, int, int]]:
    """One distinct colour per class (matplotlib's tab10, cycled)."""
    return [tuple(int(c) for c in np.array(colour) * 255) for colour in _pyplot().get_cmap("tab10").colors]


def _label_style(scale: int, colours: list[tuple[int, int, int]]) -> dict:
    """draw_bounding_boxes options for legible labels: matplotlib's DejaVu Sans sized to the image, white on
    the class colour where this torchvision can fill label backgrounds."""
    import inspect

    from matplotlib import font_manager
    from torchvision.utils import draw_bounding_boxes

    style = {"font": font_manager.findfont("DejaVu Sans"), "font_size": 7 + 3 * scale}
    if "fill_labels" in inspect.signature(draw_bounding_boxes).parameters:
        style.update(fill_labels=True, label_colors="white", label_background_colors=colours)
    return style


def drawable(output: dict, min_score: float) -> dict:
    """A model's output (one image) as draw_detections takes it, detections scoring at least `min_score`."""
    import torch

    keep = output["scores"] >= min_score
    masks = output["masks"][keep, 0] > 0.5 if "masks" in output else torch.zeros(0, 1, 1, dtype=torch.bool)
    return {"masks": masks.cpu(), "boxes": output["boxes"][keep].float().cpu(),
            "classes": (output["labels"][keep] - 1).tolist(), "scores": output["scores"][keep].float().tolist()}


def draw_detections(image, detections: dict, names: list[str], scale: int = 1):
    """uint8 [3, H, W] image with instance masks, boxes and labels drawn in one colour per class. detections:
    boolean masks [N, H, W], xyxy boxes [N, 4], 0-based class indices and scores (None for ground truth).
    `scale` enlarges the image first (masks nearest-neighbour) so that labels stay legible on small images."""
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    masks, boxes = detections["masks"], torch.as_tensor(detections["boxes"], dtype=torch.float32).reshape(-1, 4)
    if scale != 1:
        size = [image.shape[-2] * scale, image.shape[-1] * scale]
        image = F.resize(image, size, antialias=True)
        if len(masks):
            masks = F.resize(masks[:, None].to(torch.uint8), size, interpolation=InterpolationMode.NEAREST)[:, 0].bool()
        else:
            masks = masks.new_zeros((0, *size))
        boxes = boxes * scale
    if not len(detections["classes"]):
        return image
    palette = _palette()
    colours = [palette[int(c) % len(palette)] for c in detections["classes"]]
    scores = detections.get("scores")
    labels = [names[int(c)] for c in detections["classes"]]
    if scores is not None:
        labels = [f"{label} {score:.2f}" for label, score in zip(labels, scores)]
    image = draw_segmentation_masks(image, masks, alpha=0.5, colors=colours)
    style = _label_style(scale, colours)
    return draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=max(1, scale), **style)


def plot_overlays(images: list, predictions: list[dict], names: list[str], out: Path, size: int = 256) -> Path:
    """A grid of validation images with predicted masks and boxes (uint8 [3, H, W] images; predictions as
    draw_detections takes them)."""
    import torch
    from torchvision.io import write_png
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import make_grid

    tiles = [F.resize(draw_detections(image, pred, names), [size, size], antialias=True)
             for image, pred in zip(images, predictions)]
    grid = make_grid(torch.stack(tiles), nrow=4, padding=4) if tiles else torch.zeros((3, size, size), dtype=torch.uint8)
    with atomic_path(out / "val_predictions.png") as tmp:
        write_png(grid, str(tmp))
    return out / "val_predictions.png"


def plot_example(
    image, truth: dict, prediction: dict, names: list[str], path: Path, titles: tuple[str, str], scale: int = 3
) -> Path:
    """One image twice, side by side: ground truth and a model's detections (draw_detections' form), titled."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    drawn = [draw_detections(image, detections, names, scale) for detections in (truth, prediction)]
    panels = [Image.fromarray(panel.permute(1, 2, 0).numpy()) for panel in drawn]
    width, height = panels[0].size
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 14)
    header, gap = 22, 8
    canvas = Image.new("RGB", (2 * width + gap, height + header), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (panel, title) in enumerate(zip(panels, titles)):
        canvas.paste(panel, (index * (width + gap), header))
        draw.text((index * (width + gap) + 4, 3), title, fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp)
    return path
