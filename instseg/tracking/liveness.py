"""Is the driver of a RUNNING MLflow run still alive? Drivers (the train entry point, a tuning study) tag
their runs with host, pid and process start time, and refresh a heartbeat tag while they work. A run whose
driver is gone (SIGKILL, a lost machine) is recognised from these tags: the next start marks it KILLED with
a note (`close_orphaned_runs`, also `instseg runs clean`), or resumes it when given its run_name; a second
driver for a run_name whose driver is alive is refused (`check_no_live_driver`)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterable, Mapping

import psutil
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from instseg.errors import ConfigError
from instseg.tracking.runs import quiet_urls

HOST_TAG = "instseg.driver_host"
PID_TAG = "instseg.driver_pid"
STARTED_TAG = "instseg.driver_started"  # the process's start time: a pid the OS gave to another process is not ours
HEARTBEAT_TAG = "instseg.heartbeat"  # unix time of the driver's last sign of life
NOTE_TAG = "instseg.note"
DRIVER_TAGS = (HOST_TAG, PID_TAG, STARTED_TAG)
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a driver on another machine counts as gone after this long without a heartbeat


def driver_tags() -> dict[str, str]:
    """Who this driver is: the tags a run it owns carries (trial runs carry their study driver's)."""
    process = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(process.pid),
        STARTED_TAG: f"{process.create_time():.2f}",
        HEARTBEAT_TAG: f"{time.time():.0f}",
    }


def driver_alive(tags: Mapping[str, str], now: float | None = None) -> bool | None:
    """True / False for a run with driver tags (same host: is that process still there; another host: is its
    heartbeat recent); None for a run without them (made by an older version: not judged)."""
    if PID_TAG not in tags or HOST_TAG not in tags:
        return None
    if tags[HOST_TAG] != socket.gethostname():
        beat = float(tags.get(HEARTBEAT_TAG) or 0)
        return (now or time.time()) - beat < STALE_AFTER_S
    try:
        process = psutil.Process(int(tags[PID_TAG]))
        return (
            abs(process.create_time() - float(tags.get(STARTED_TAG) or 0)) < 1.0
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def describe_driver(tags: Mapping[str, str]) -> str:
    beat = tags.get(HEARTBEAT_TAG)
    since = f", last heartbeat {time.time() - float(beat):.0f} s ago" if beat else ""  # "" when never beaten
    return f"pid {tags.get(PID_TAG)} on {tags.get(HOST_TAG)}{since}"


def check_no_live_driver(run: Any, name: str) -> None:
    """ConfigError when `run` (found by run_name) is RUNNING under a driver that is still alive: two drivers
    would log the same epochs twice into one MLflow run and one checkpoint folder."""
    if run is not None and run.info.status == "RUNNING" and driver_alive(run.data.tags):
        raise ConfigError(
            f"run_name '{name}' is being run right now by {describe_driver(run.data.tags)} "
            f"(MLflow run {run.info.run_id}): "
            "wait for it, stop it (Ctrl-C, `ray job stop`), or choose another run_name"
        )


def close_orphaned_runs(uri: str, experiments: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """Mark KILLED, with a note, every RUNNING run whose driver is gone; returns (run id, run name, note) of each.
    `experiments`: names (default: all)."""
    client = MlflowClient(uri)
    if experiments is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        ids = [e.experiment_id for e in (client.get_experiment_by_name(n) for n in experiments) if e is not None]
    if not ids:
        return []
    closed = []
    now = time.time()
    for run in client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=5000):
        tags = dict(run.data.tags)
        parent_id = tags.get(MLFLOW_PARENT_RUN_ID)
        if parent_id and HEARTBEAT_TAG not in tags:  # a trial run: its study's driver beats on the study's run
            tags[HEARTBEAT_TAG] = client.get_run(parent_id).data.tags.get(HEARTBEAT_TAG, "")
        if driver_alive(tags, now) is not False:
            continue
        note = (
            f"driver {describe_driver(tags)} is gone (killed, or its machine was lost); "
            f"marked KILLED at {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        client.set_tag(run.info.run_id, NOTE_TAG, note)
        with quiet_urls(uri):
            client.set_terminated(run.info.run_id, status="KILLED")
        closed.append((run.info.run_id, run.data.tags.get(MLFLOW_RUN_NAME, ""), note))
    return closed


class Heartbeat:
    """While the block runs, a daemon thread refreshes HEARTBEAT_TAG on `run_id` every HEARTBEAT_S seconds.
    A tracking server that does not answer only delays a beat: it never stops the driver."""

    def __init__(self, uri: str, run_id: str, interval_s: float = HEARTBEAT_S) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="instseg-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception:  # noqa: BLE001 (an outage: the next beat tries again)
                continue

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
