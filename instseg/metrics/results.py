"""A run's results per epoch: the table rank 0 prints and `results.csv` (Ultralytics' columns where they exist).

Both read the metrics dict an epoch reports (instseg.metrics.names), so what the table, the CSV, MLflow and
the checkpoints say about an epoch is the same numbers.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from instseg.data.files import atomic_write_text
from instseg.metrics.names import (
    EPOCH,
    EPOCH_TIME,
    FITNESS,
    LEARNING_RATE,
    TRAIN_LOSS,
    TRAIN_LOSS_KEYS,
    train_key,
    val_key,
)

RESULTS_CSV = "results.csv"

# (results.csv column, metric key); "time" is the cumulative training time, as in Ultralytics
RESULTS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("epoch", EPOCH),
    ("time", EPOCH_TIME),
    ("train/loss", TRAIN_LOSS),
    *((f"train/{key}", train_key(key)) for key in TRAIN_LOSS_KEYS),
    *(
        (f"metrics/{column}({suffix})", val_key(iou_type, stat))
        for iou_type, suffix in (("bbox", "B"), ("segm", "M"))
        for column, stat in (("precision", "precision"), ("recall", "recall"), ("mAP50", "map50"), ("mAP50-95", "map"))
    ),
    ("val/loss", "val/loss"),
    *((f"val/{key}", f"val/{key}") for key in TRAIN_LOSS_KEYS),
    ("lr/pg0", LEARNING_RATE),
    ("fitness", FITNESS),
)

# the printed table: (header, metric key, width, format)
TABLE_COLUMNS: tuple[tuple[str, str, int, str], ...] = (
    ("Epoch", EPOCH, 9, ""),
    ("Time", EPOCH_TIME, 8, ".1f"),
    ("train/loss", TRAIN_LOSS, 11, ".4f"),
    ("val/loss", "val/loss", 10, ".4f"),
    ("Box(P", val_key("bbox", "precision"), 9, ".3f"),
    ("R", val_key("bbox", "recall"), 7, ".3f"),
    ("mAP50", val_key("bbox", "map50"), 7, ".3f"),
    ("mAP50-95)", val_key("bbox", "map"), 10, ".3f"),
    ("Mask(P", val_key("segm", "precision"), 9, ".3f"),
    ("R", val_key("segm", "recall"), 7, ".3f"),
    ("mAP50", val_key("segm", "map50"), 7, ".3f"),
    ("mAP50-95)", val_key("segm", "map"), 10, ".3f"),
    ("fitness", FITNESS, 9, ".4f"),
)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


class EpochTable:
    """One aligned row per epoch, under a header printed before the first row this process shows."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.header_shown = False

    def header(self) -> str:
        return "".join(f"{title:>{width}}" for title, _, width, _ in TABLE_COLUMNS)

    def row(self, metrics: dict[str, Any]) -> str:
        cells = []
        for _, key, width, fmt in TABLE_COLUMNS:
            if key == EPOCH:
                text = f"{int(metrics[EPOCH])}/{self.epochs}"
            elif key == EPOCH_TIME:
                text = f"{_cell(metrics.get(key), fmt)}s"
            else:
                text = _cell(metrics.get(key), fmt)
            cells.append(f"{text:>{width}}")
        return "".join(cells)

    def lines(self, metrics: dict[str, Any]) -> list[str]:
        """The lines to print for this epoch: the header the first time, then the row."""
        lines = [] if self.header_shown else [self.header()]
        self.header_shown = True
        return [*lines, self.row(metrics)]


def results_rows(epochs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """results.csv rows from each epoch's reported metrics, oldest first (time: cumulative seconds)."""
    rows, elapsed = [], 0.0
    for metrics in epochs:
        elapsed += float(metrics.get(EPOCH_TIME, 0.0))
        row = {column: metrics.get(key) for column, key in RESULTS_COLUMNS}
        row["epoch"], row["time"] = int(metrics[EPOCH]), round(elapsed, 3)
        rows.append(row)
    return rows


def results_csv(epochs: Sequence[dict[str, Any]]) -> str:
    """The text of results.csv (a missing metric is an empty cell)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[column for column, _ in RESULTS_COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(results_rows(epochs))
    return out.getvalue()


def write_results_csv(path: Path, epochs: Sequence[dict[str, Any]]) -> Path:
    atomic_write_text(path, results_csv(epochs))
    return path
