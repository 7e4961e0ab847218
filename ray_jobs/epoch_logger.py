"""Per-epoch metrics go to MLflow from the Train controller, at the moment it accepts a report.

The controller registers the report's checkpoint (and writes its run snapshot) before it calls user
callbacks, so a metric step exists in MLflow exactly when the checkpoint of that epoch does: a worker
killed mid-epoch, or before the controller took its report, leaves neither, and the restarted epoch
logs its step once. Under Tune this callback runs before TuneReportCallback, so a trial that the
scheduler stops on this report still has the report's metrics in its run.

An MLflow outage does not stop training: a report that cannot be logged quickly is kept, in order, and
sent before the next one; the last report of a run waits for the server (up to OUTAGE_WAIT_S). More than
MAX_PENDING_EPOCHS unsent epochs end the run with an error that says so (the controller is not retried by
Ray, so an exception here would otherwise end the run whatever ray.max_failures says: nothing else raises).

Each accepted checkpoint's results.csv (every epoch so far) is also copied beside the run's checkpoints, through
the storage's own filesystem (a local folder or an object store alike), and sent to the MLflow run with the
metrics (held back with them during an outage: only the newest is sent).
"""

from __future__ import annotations

import time
from typing import Any

from pyarrow import fs
from ray.train import Checkpoint, UserCallback

from instseg.errors import first_line
from instseg.metrics.names import EARLY_STOPPED, EPOCH
from instseg.metrics.results import RESULTS_CSV
from instseg.redaction import redact
from instseg.tracking.runs import RunLogger, quick_requests

MAX_PENDING_EPOCHS = 100
OUTAGE_WAIT_S = 600.0  # the last report of a run waits this long for an unreachable server
RETRY_EVERY_S = 5.0


class MetricsBacklogFull(RuntimeError):
    """The tracking server stayed unreachable for more epochs than the buffer holds."""


class EpochMetricsLogger(UserCallback):
    def __init__(self, uri: str, run_id: str, epochs: int, max_pending: int = MAX_PENDING_EPOCHS) -> None:
        self.uri = uri
        self.run_id = run_id
        self.epochs = epochs
        self.max_pending = max_pending
        # (epoch, metrics, when measured in ms) not yet in MLflow, oldest first; the fixed timestamp makes a
        # resend of a batch that did arrive (a timeout after the server took it) a no-op
        self.pending: list[tuple[int, dict[str, Any], int]] = []
        self.results_text: str | None = None  # the newest results.csv not yet in MLflow

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        values = metrics[0]  # rank 0: every rank reports the same, already reduced, values
        if checkpoint is not None:
            self.results_text = copy_results_beside(checkpoint) or self.results_text
        epoch = int(values[EPOCH])
        self.pending.append((epoch, values, int(time.time() * 1000)))
        last = epoch >= self.epochs or bool(values.get(EARLY_STOPPED))
        deadline = time.monotonic() + (OUTAGE_WAIT_S if last else 0.0)
        while not self._flush():
            if len(self.pending) > self.max_pending:
                raise MetricsBacklogFull(
                    self._unreachable(f"for {len(self.pending)} epochs, more than the {self.max_pending} kept")
                )
            if time.monotonic() >= deadline:
                if last:
                    raise MetricsBacklogFull(self._unreachable(f"at the end of the run (waited {OUTAGE_WAIT_S:.0f} s)"))
                print(
                    f"MLflow unreachable: epoch {epoch}'s metrics are kept and sent when it answers "
                    f"({len(self.pending)} epoch(s) waiting)",
                    flush=True,
                )
                return
            time.sleep(RETRY_EVERY_S)

    def _flush(self) -> bool:
        """Send the waiting epochs in order; True when none is left."""
        logger = RunLogger(self.uri, self.run_id)
        while self.pending:
            epoch, values, measured = self.pending[0]
            try:
                with quick_requests():
                    logger.log_metrics(values, step=epoch, timestamp_ms=measured)
            except Exception:  # noqa: BLE001 (whatever the client raises for an unreachable server)
                return False
            self.pending.pop(0)
        if self.results_text is not None:
            try:
                with quick_requests():
                    logger.log_text(self.results_text, RESULTS_CSV)
            except Exception:  # noqa: BLE001 (as above)
                return False
            self.results_text = None
        return True

    def _unreachable(self, how_long: str) -> str:
        epochs = [epoch for epoch, _, _ in self.pending]
        return (
            f"the MLflow server at {redact(self.uri)} was unreachable {how_long}: epochs {epochs} of run "
            f"{self.run_id} are not in MLflow (their checkpoints are saved; rerun with the same run_name to resume)"
        )


def copy_results_beside(checkpoint: Checkpoint) -> str | None:
    """The checkpoint's results.csv to the run's folder (the checkpoints' parent), replaced in one move; returns
    its text (None for a checkpoint without one). The copy is a convenience: a storage error is reported in one
    line, never raised (an exception in this callback would end the run)."""
    storage = checkpoint.filesystem
    parent = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    source = f"{checkpoint.path}/{RESULTS_CSV}"
    try:
        if storage.get_file_info(source).type != fs.FileType.File:
            return None
        with storage.open_input_stream(source) as stream:
            text = stream.read().decode("utf-8")
    except OSError as exc:
        print(f"could not read {source}: {first_line(exc, 300)}", flush=True)
        return None
    staging = f"{parent}/.{RESULTS_CSV}.{time.time_ns()}"
    try:
        with storage.open_output_stream(staging) as stream:
            stream.write(text.encode("utf-8"))
        storage.move(staging, f"{parent}/{RESULTS_CSV}")
    except OSError as exc:
        print(f"could not write {parent}/{RESULTS_CSV} (it is in each checkpoint): {first_line(exc, 300)}", flush=True)
    return text
