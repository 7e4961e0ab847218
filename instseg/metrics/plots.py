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
