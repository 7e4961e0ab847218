"""Per-epoch metrics go to MLflow from the Train controller, at the moment it accepts a report.

The controller registers the report's checkpoint (and writes its run snapshot) before it calls user
callbacks, so a metric step exists in MLflow exactly when the checkpoint of that epoch does: a worker
killed mid-epoch, or before the controller took its report, leaves neither, and the restarted epoch
logs its step once. Under Tune this callback runs before TuneReportCallback, so a trial that the
scheduler stops on this report still has the report's metrics in its run.
"""

from __future__ import annotations

from typing import Any

from ray.train import Checkpoint, UserCallback

from instseg.metrics.names import EPOCH
from instseg.tracking.runs import RunLogger


class EpochMetricsLogger(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        values = metrics[0]  # rank 0: every rank reports the same, already reduced, values
        RunLogger(self.tracking_uri, self.run_id).log_metrics(values, step=int(values[EPOCH]))
