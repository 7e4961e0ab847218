"""Plots of evaluation results (matplotlib, Agg backend chosen at call time: nothing happens at import)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from instseg.metrics.detection import ClassCurves, ConfusionMatrix


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
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
        fig.savefig(out / file_name, dpi=120)
        plt.close(fig)
        paths.append(out / file_name)
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
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    return out / "loss_curves.png"


def plot_overlays(images: list, predictions: list[dict], names: list[str], out: Path, size: int = 256) -> Path:
    """A grid of validation images with predicted masks and boxes (uint8 [3, H, W] images; predictions with
    boolean masks [N, H, W], xyxy boxes, 0-based class indices and scores)."""
    import torch
    from torchvision.io import write_png
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

    palette = [tuple(int(c) for c in np.array(plt_color) * 255) for plt_color in _pyplot().get_cmap("tab20").colors]
    tiles = []
    for image, pred in zip(images, predictions):
        colors = [palette[int(c) % len(palette)] for c in pred["classes"]]
        tile = image
        if len(pred["classes"]):
            tile = draw_segmentation_masks(tile, pred["masks"], alpha=0.5, colors=colors)
            labels = [f"{names[int(c)]} {s:.2f}" for c, s in zip(pred["classes"], pred["scores"])]
            tile = draw_bounding_boxes(tile, pred["boxes"], labels=labels, colors=colors, width=2)
        tiles.append(F.resize(tile, [size, size], antialias=True))
    grid = make_grid(torch.stack(tiles), nrow=4, padding=4) if tiles else torch.zeros((3, size, size), dtype=torch.uint8)
    write_png(grid, str(out / "val_predictions.png"))
    return out / "val_predictions.png"
