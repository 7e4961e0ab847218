"""Plots a person can read: class names on confusion matrices up to ~100 classes, per-class curves coloured and
named up to 20 classes (grey beyond) with the mean bold, a PR legend that says which AP it shows, and a
validation grid that keeps each image's aspect ratio with ground truth beside the predictions."""

import numpy as np
import pytest
import torch
from PIL import Image

from instseg.metrics import plots
from instseg.metrics.detection import ConfusionMatrix, ap_per_class


@pytest.fixture
def figures(monkeypatch):
    """Each figure the plot functions save, kept open for inspection (its file is still written)."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        fig.savefig(path, dpi=120)
        return path

    monkeypatch.setattr(plots, "_save_figure", keep)
    yield kept
    for fig in kept:
        plots._pyplot().close(fig)


def names(count: int) -> list[str]:
    return [f"class{i}" for i in range(count)]


@pytest.mark.parametrize("classes", [5, 80, 100])
def test_confusion_matrix_names_every_class_on_a_canvas_sized_to_them(classes, figures, tmp_path):
    matrix = ConfusionMatrix(classes)
    matrix.matrix[np.arange(classes), np.arange(classes)] = 3
    counts, _ = plots.plot_confusion_matrix(matrix, names(classes), tmp_path)
    ax = figures[0].axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == [*names(classes), "background"]
    assert [label.get_text() for label in ax.get_yticklabels()] == [*names(classes), "background"]
    width, _ = Image.open(counts).size
    assert width >= 120 * 0.2 * (classes + 1)  # about 0.2 inch (24 px) or more per class at 120 dpi
    # the counts are written in the cells only while they fit
    assert bool(ax.texts) == (classes <= plots.ANNOTATED_CLASSES)


def curves_for(classes: int):
    rng = np.random.default_rng(0)
    n = 40 * classes
    return ap_per_class(
        rng.random((n, 10)) > 0.5, rng.random(n), np.repeat(np.arange(classes), 40), np.repeat(np.arange(classes), 30)
    )


def test_few_classes_get_a_colour_and_a_name_with_their_ap_and_the_pr_legend_names_both_aps(figures, tmp_path):
    curves = curves_for(5)
    plots.plot_curves(curves, names(5), tmp_path, coco_map50=0.4321)
    pr = figures[0].axes[0]
    labels = [text.get_text() for text in pr.get_legend().get_texts()]
    assert labels[:5] == [f"class{i} {curves.ap[i, 0]:.3f}" for i in range(5)]
    mean = labels[-1]
    assert f"mAP50 {curves.ap[:, 0].mean():.3f} (101-point, Ultralytics)" in mean
    assert "COCO mAP50 0.432 (pycocotools)" in mean
    assert pr.get_lines()[-1].get_linewidth() > 2 * pr.get_lines()[0].get_linewidth()  # the mean is bold
    assert len({line.get_color() for line in pr.get_lines()[:5]}) == 5


def test_many_classes_are_thin_grey_lines_under_a_bold_mean(figures, tmp_path):
    plots.plot_curves(curves_for(25), names(25), tmp_path)
    for fig in figures:  # PR, P, R, F1
        ax = fig.axes[0]
        per_class, mean = ax.get_lines()[:-1], ax.get_lines()[-1]
        assert len(per_class) == 25 and {line.get_color() for line in per_class} == {"grey"}
        assert [text.get_text() for text in ax.get_legend().get_texts()] == [mean.get_label()]
        assert mean.get_label().startswith("all 25 classes (each in grey)")


def test_the_validation_grid_keeps_aspect_ratios_and_puts_truth_beside_predictions(tmp_path):
    wide, tall = torch.zeros((3, 60, 120), dtype=torch.uint8), torch.zeros((3, 120, 60), dtype=torch.uint8)
    truth = {
        "masks": torch.zeros((1, 60, 120), dtype=torch.bool),
        "boxes": [[10, 10, 50, 40]],
        "classes": [0],
        "scores": None,
    }
    truth["masks"][0, 10:40, 10:50] = True
    nothing = {"masks": torch.zeros((0, 120, 60), dtype=torch.bool), "boxes": [], "classes": [], "scores": []}
    samples = [(wide, truth, {**truth, "scores": [0.9]}), (tall, {**nothing, "scores": None}, nothing)]
    path = plots.plot_overlays(samples, ["shape"], tmp_path / "grid.png", tile=200, pairs_per_row=2)
    grid = np.asarray(Image.open(path).convert("RGB"))
    gap, header = 6, 24
    assert grid.shape[:2] == (header + 200, 4 * 200 + 3 * gap)  # one row: truth, prediction, truth, prediction

    def drawn_extent(column: int) -> tuple[int, int]:
        tile = grid[header:, column * (200 + gap) : column * (200 + gap) + 200]
        rows, cols = np.nonzero((tile < 250).any(axis=2))  # the image is black, its letterbox white
        return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1

    assert drawn_extent(0) == (100, 200) and drawn_extent(1) == (100, 200)  # 1:2 kept, not squashed to a square
    assert drawn_extent(2) == (200, 100) and drawn_extent(3) == (200, 100)
    # the truth tile shows the mask, the prediction tile of the empty prediction does not
    assert (grid[header:, 0:200] != 0).any(axis=2).sum() > 0
    assert not ((grid[header:, 3 * 206 : 3 * 206 + 200] != 0) & (grid[header:, 3 * 206 : 3 * 206 + 200] != 255)).any()
