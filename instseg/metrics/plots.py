"""Plots of evaluation results (matplotlib, Agg backend chosen at call time: nothing happens at import)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from instseg.data.files import atomic_path
from instseg.metrics.detection import ClassCurves, ConfusionMatrix

LABELLED_CLASSES = 100  # the confusion matrix names its classes up to this many (background aside)
ANNOTATED_CLASSES = 30  # ... and writes the value in each cell up to this many
COLOURED_CLASSES = 20  # curves: a colour and a legend entry per class up to this many, thin grey lines beyond


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
    """Counts and normalised by true class; the canvas grows with the class count so that every class keeps
    its name (up to LABELLED_CLASSES) and, for few classes, each cell its value."""
    plt = _pyplot()
    labels = [*names, "background"]
    count = len(labels)
    size = min(max(6.0, 0.22 * count + 2.5), 30.0)  # inches: ~0.22 per class, 120 dpi
    font = 8 if count <= ANNOTATED_CLASSES else (7 if count <= 60 else 6)
    ticks = list(range(count)) if count <= LABELLED_CLASSES + 1 else []
    paths = []
    for normalize, name in ((False, "confusion_matrix.png"), (True, "confusion_matrix_normalized.png")):
        values = matrix.normalized() if normalize else matrix.matrix
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        image = ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=font)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=font)
        if count <= ANNOTATED_CLASSES:
            threshold = values.max() / 2 if values.size else 0
            for (row, column), value in np.ndenumerate(values):
                if value:
                    ax.text(
                        column,
                        row,
                        f"{value:.2f}" if normalize else f"{int(value)}",
                        ha="center",
                        va="center",
                        fontsize=font,
                        color="white" if value > threshold else "black",
                    )
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.set_title(f"confusion matrix{' (normalised by true class)' if normalize else ''}")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        paths.append(_save_figure(fig, out / name))
    return paths


def plot_curves(curves: ClassCurves, names: list[str], out: Path, coco_map50: float | None = None) -> list[Path]:
    """PR (IoU 0.5) and P / R / F1 against confidence: one line per class (coloured and named up to
    COLOURED_CLASSES, thin grey beyond), the mean over classes bold. The PR legend gives the mean AP50 it plots
    (101-point interpolated, Ultralytics' number) and, when known, COCO's mAP50 (pycocotools), which differs."""
    plt = _pyplot()
    x = curves.confidence
    has_classes = len(curves.classes) > 0
    many = len(curves.classes) > COLOURED_CLASSES
    ap50 = curves.ap[:, 0] if has_classes else np.zeros(0)
    pr_note = f"mAP50 {ap50.mean() if has_classes else 0:.3f} (101-point, Ultralytics)"
    if coco_map50 is not None:
        pr_note += f"\nCOCO mAP50 {coco_map50:.3f} (pycocotools)"
    f1_note = f"best {curves.f1_curve.mean(0).max() if has_classes else 0:.3f} at {curves.best_confidence:.3f}"
    specs = (
        ("PR_curve.png", curves.pr_curve, "recall", "precision", pr_note, True),
        ("P_curve.png", curves.p_curve, "confidence", "precision", "", False),
        ("R_curve.png", curves.r_curve, "confidence", "recall", "", False),
        ("F1_curve.png", curves.f1_curve, "confidence", "F1", f1_note, False),
    )
    paths = []
    for file_name, values, xlabel, ylabel, note, per_class_ap in specs:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for row, cls, ap in zip(values, curves.classes, ap50):
            if many:
                ax.plot(x, row, linewidth=0.5, color="grey", alpha=0.5)
            else:
                ax.plot(x, row, linewidth=1, label=f"{names[int(cls)]} {ap:.3f}" if per_class_ap else names[int(cls)])
        if has_classes:
            classes = f"all {len(curves.classes)} classes" + (" (each in grey)" if many else "")
            ax.plot(x, values.mean(0), linewidth=3, color="blue", label=f"{classes} {note}".strip())
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if has_classes:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
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
    return {
        "masks": masks.cpu(),
        "boxes": output["boxes"][keep].float().cpu(),
        "classes": (output["labels"][keep] - 1).tolist(),
        "scores": output["scores"][keep].float().tolist(),
    }


def target_drawable(target: dict) -> dict:
    """A dataset target (instseg's target schema) as draw_detections takes ground truth: no scores."""
    return {
        "masks": target["masks"].bool(),
        "boxes": target["boxes"],
        "classes": (target["labels"] - 1).tolist(),
        "scores": None,
    }


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


def _fit(image, tile: int):
    """uint8 [3, H, W] scaled (aspect ratio kept) to fit a tile x tile square and centred on a white one."""
    import torch
    from torchvision.transforms.v2 import functional as F

    height, width = image.shape[-2:]
    scale = tile / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    resized = F.resize(image, size, antialias=True)
    canvas = torch.full((3, tile, tile), 255, dtype=torch.uint8)
    top, left = (tile - size[0]) // 2, (tile - size[1]) // 2
    canvas[:, top : top + size[0], left : left + size[1]] = resized
    return canvas


def plot_overlays(samples: list[tuple], names: list[str], path: Path, tile: int = 320, pairs_per_row: int = 2) -> Path:
    """A grid of validation images, each as two tiles side by side: ground truth, then the predictions (samples:
    (uint8 image [3, H, W], truth, prediction), both as draw_detections takes them). Tiles keep each image's
    aspect ratio; small images are drawn enlarged so that their labels stay legible."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    gap, header = 6, 24
    columns = 2 * min(pairs_per_row, max(1, len(samples)))
    rows = max(1, -(-len(samples) // pairs_per_row))
    canvas = Image.new("RGB", (columns * (tile + gap) - gap, header + rows * (tile + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 15)
    for column in range(columns):
        draw.text(
            (column * (tile + gap) + 4, 3), "ground truth" if column % 2 == 0 else "prediction", fill="black", font=font
        )
    for index, (image, truth, prediction) in enumerate(samples):
        scale = max(1, tile // max(image.shape[-2:]))
        for side, detections in enumerate((truth, prediction)):
            drawn = _fit(draw_detections(image, detections, names, scale), tile)
            x = (2 * (index % pairs_per_row) + side) * (tile + gap)
            y = header + (index // pairs_per_row) * (tile + gap)
            canvas.paste(Image.fromarray(drawn.permute(1, 2, 0).numpy()), (x, y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


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
