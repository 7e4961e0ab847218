"""What rank 0 shows while training (progress lines or bar, the epoch table) and results.csv."""

import csv
import io

import pytest
import torch

from instseg.engine.loops import train_one_epoch
from instseg.engine.progress import BarProgress, LineProgress
from instseg.metrics.names import EPOCH, EPOCH_TIME, FITNESS, TRAIN_LOSS, val_key
from instseg.metrics.results import RESULTS_COLUMNS, EpochTable, results_csv
from tests.helpers import load_bench, tiny_model


class RecordingProgress:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, steps):
        self.events.append(("start", steps))

    def step(self, step, images, loss):
        self.events.append(("step", step, images, loss is not None))

    def close(self):
        self.events.append(("close",))


def test_the_loop_reports_every_step_and_the_loss_every_log_every_steps():
    bench = load_bench()
    model = tiny_model()
    progress = RecordingProgress()
    batches = bench.synthetic_batches(3, 2, 128)
    train_one_epoch(
        model, bench.reference_optimizer(model), batches, torch.device("cpu"), log_every=2, progress=progress
    )
    assert progress.events == [
        ("start", 3),
        ("step", 1, 2, False),
        ("step", 2, 4, True),
        ("step", 3, 6, False),
        ("close",),
    ]


def test_progress_lines_say_step_loss_rate_and_eta():
    lines: list[str] = []
    progress = LineProgress(3, 10, lines.append)
    progress.start(40)
    progress.step(19, 76, None)  # the loss was not read on this step: no line
    progress.step(20, 80, 1.23456)
    assert len(lines) == 1
    assert lines[0].startswith("epoch 3/10  step 20/40  loss 1.2346  ") and "img/s  ETA 0:" in lines[0]


class FakeBar:
    def __init__(self, **kwargs) -> None:
        self.kwargs, self.n, self.descriptions, self.closed = kwargs, 0, [], False

    def update(self, n):
        self.n += n

    def set_description(self, text):
        self.descriptions.append(text)

    def close(self):
        self.closed = True


def test_the_bar_counts_steps_and_shows_the_loss_in_its_description():
    progress = BarProgress(1, 2, FakeBar)
    progress.start(5)
    for step in range(1, 6):
        progress.step(step, step * 4, 0.5 if step == 4 else None)
    progress.close()
    bar = progress.bar
    assert bar.kwargs == {"total": 5, "desc": "epoch 1/2", "unit": "step"} and bar.n == 5 and bar.closed
    assert len(bar.descriptions) == 1 and bar.descriptions[0].startswith("epoch 1/2 loss 0.5000 ")


def epoch_metrics(epoch: int, seconds: float, segm_map: float) -> dict[str, float]:
    return {
        EPOCH: epoch,
        EPOCH_TIME: seconds,
        TRAIN_LOSS: 2.0 / epoch,
        "val/loss": 1.5,
        val_key("segm", "map"): segm_map,
        val_key("bbox", "precision"): 0.5,
        FITNESS: segm_map * 0.9,
    }


def test_epoch_table_prints_a_header_once_then_aligned_rows():
    table = EpochTable(epochs=12)
    first, second = table.lines(epoch_metrics(1, 3.25, 0.1)), table.lines(epoch_metrics(2, 3.0, 0.2))
    assert len(first) == 2 and len(second) == 1
    header, row = first
    assert "Box(P" in header and "Mask(P" in header and "mAP50-95)" in header
    assert len(header) == len(row) == len(second[0])  # columns line up
    assert row.split()[:4] == ["1/12", "3.2s", "2.0000", "1.5000"]
    assert "-" in row.split()  # a metric the epoch lacks shows as '-', not as 0


def test_results_csv_has_ultralytics_columns_and_cumulative_time():
    text = results_csv([epoch_metrics(1, 3.0, 0.1), epoch_metrics(2, 4.5, 0.2)])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [column for column, _ in RESULTS_COLUMNS]
    assert {"metrics/mAP50-95(M)", "metrics/precision(B)", "lr/pg0"} <= set(rows[0])
    assert [row["epoch"] for row in rows] == ["1", "2"] and [float(row["time"]) for row in rows] == [3.0, 7.5]
    assert float(rows[1]["metrics/mAP50-95(M)"]) == pytest.approx(0.2) and rows[1]["metrics/mAP50(M)"] == ""


def test_results_csv_is_copied_beside_the_checkpoints_and_a_storage_error_is_one_line(tmp_path, capsys):
    from ray.train import Checkpoint

    from ray_jobs.epoch_logger import copy_results_beside

    text = results_csv([epoch_metrics(1, 3.0, 0.1)])
    for run in ("ok", "blocked"):
        (tmp_path / run / "epoch_0001").mkdir(parents=True)
        (tmp_path / run / "epoch_0001" / "results.csv").write_text(text)
    assert copy_results_beside(Checkpoint(str(tmp_path / "ok" / "epoch_0001"))) == text
    assert (tmp_path / "ok" / "results.csv").read_text() == text
    # a folder where the copy should go: the copy fails, the callback (and so the run) goes on with the text
    (tmp_path / "blocked" / "results.csv").mkdir()
    (tmp_path / "blocked" / "results.csv" / "keep").write_text("x")
    assert copy_results_beside(Checkpoint(str(tmp_path / "blocked" / "epoch_0001"))) == text
    assert capsys.readouterr().out.startswith(f"could not write {tmp_path / 'blocked'}/results.csv")


def test_ray_trains_per_report_log_is_quieted_by_its_module_not_by_a_path_ending():
    import logging

    from ray.train.v2._internal.execution import context

    from ray_jobs.train_loop import quiet_ray_train_reports

    logger = logging.getLogger(context.__file__)
    level = logger.level
    try:
        quiet_ray_train_reports()
        # the logger Ray reports through (named after its file) is the one set to WARNING
        assert context.logger is logger and logger.level == logging.WARNING
    finally:
        logger.setLevel(level)
