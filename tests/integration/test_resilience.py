"""No run left in a false state, no secret leaked, no outage fatal, against real Ray, a real MLflow server
and real driver processes:

- training goes on through an MLflow server outage (stopped in epoch 2 of 4, back 15 s later), every epoch
  arrives once and in order, and the password of the tracking URI appears in no printed line, param, tag,
  artifact or checkpoint;
- a second driver for a live run_name is refused; a SIGKILLed driver's run is recognised as orphaned and
  marked KILLED by `instseg runs clean`;
- a study interrupted with Ctrl-C or SIGTERM leaves no trial run RUNNING, and says so in one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from instseg.cli import main as cli_main
from instseg.metrics.names import FITNESS
from instseg.tracking.liveness import NOTE_TAG
from instseg.tracking.runs import child_runs, find_run
from tests.helpers import (
    DEMO_CONFIG,
    RAY_LOG_LINE,
    ROOT,
    assert_one_point_per_epoch,
    cli_overrides,
    files_containing,
    finish,
    steps,
    wait_for_epoch,
)
from tests.servers import free_port, stop_process_group

pytestmark = pytest.mark.integration

MLFLOW_CLI = str(Path(sys.executable).parent / "mlflow")
TOKEN = "XYZZY"  # the part of the password searched for everywhere (unchanged by percent-encoding)
PASSWORD = f"pa/ss@w0rd?{TOKEN}&x"
OUTAGE_S = 15


class MlflowServer:
    """`mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts in a local folder), stoppable and
    restartable on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 90) -> None:
        command = [
            MLFLOW_CLI,
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not start:\n{(self.folder / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process_group(self.process, timeout=20)
        self.process = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


def start_in_session(module: str, overrides: list[str]) -> subprocess.Popen:
    """A driver in its own process group, so that the local Ray it starts can be cleaned up with it."""
    return subprocess.Popen(
        [sys.executable, "-m", module, "--config", str(DEMO_CONFIG), *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def test_training_outlives_an_mlflow_outage_and_no_secret_leaves_the_process(
    mlflow_server, longer_epochs_root, tmp_path
):
    uri = f"http://alice:{quote(PASSWORD, safe='')}@127.0.0.1:{mlflow_server.port}"
    process = start_in_session(
        "ray_jobs.train",
        cli_overrides(longer_epochs_root, tmp_path, f"tracking.uri={uri}", "train.epochs=4", "run_name=outage"),
    )
    outage: dict[str, float] = {}

    def outage_in_epoch_two() -> None:
        wait_for_epoch(uri, "outage", 1, process=None)
        time.sleep(1.0)
        outage["stopping"] = time.time()
        mlflow_server.stop()
        outage["stopped"] = time.time()
        time.sleep(OUTAGE_S)
        mlflow_server.start()
        outage["restarted"] = time.time()

    helper = threading.Thread(target=outage_in_epoch_two, daemon=True)
    helper.start()
    try:
        output = finish(process, timeout=500)
        outage["exited"] = time.time()
    finally:
        kill_group(process)
    helper.join(timeout=120)
    assert process.returncode == 0, output[-4000:]
    assert "restarted" in outage, "the outage never happened"

    client = MlflowClient(uri)
    run = find_run(uri, "faults", "outage", kind="train")
    assert run.info.status == "FINISHED"
    assert_one_point_per_epoch(uri, run.info.run_id, epochs=4)  # every epoch once: none lost, none doubled
    # epochs measured while the server was going down or down are in MLflow, with the time they were measured:
    # the controller kept them and sent them later
    measured = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, FITNESS)}
    held = [epoch for epoch, at in measured.items() if outage["stopping"] <= at <= outage["restarted"]]
    assert held, f"no epoch was held back through the outage: {measured}, {outage}"
    assert "MLflow unreachable" in output
    assert [a.path for a in client.list_artifacts(run.info.run_id, "bundle")], "the final bundle was logged"
    # results.csv went with the held metrics: the run's copy has every epoch
    results = Path(client.download_artifacts(run.info.run_id, "results.csv", str(tmp_path / "results")))
    assert [line.split(",")[0] for line in results.read_text().splitlines()[1:]] == ["1", "2", "3", "4"]
    print(
        f"outage {outage['restarted'] - outage['stopping']:.1f} s; epochs measured during it: {sorted(held)}; "
        f"driver done {outage['exited'] - outage['restarted']:.1f} s after the restart"
    )

    # the password: not printed, not in params or tags, not in any artifact, checkpoint or run folder
    assert TOKEN not in output and "***@127.0.0.1" in output
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if TOKEN in v]
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    assert (artifacts / "config.yaml").is_file() and (artifacts / "bundle" / "model.json").is_file()
    assert files_containing(artifacts, TOKEN.encode()) == []
    assert files_containing(tmp_path / "ray_results", TOKEN.encode()) == []
    assert list((tmp_path / "ray_results").rglob("checkpoint.pt")), "the checkpoints were searched"


def test_a_live_run_name_is_refused_and_a_killed_driver_is_recognised(longer_epochs_root, tmp_path, capsys):
    overrides = cli_overrides(longer_epochs_root, tmp_path, "train.epochs=30", "run_name=twice")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = start_in_session("ray_jobs.train", overrides)
    try:
        run_id = wait_for_epoch(tracking_uri, "twice", 1, process=first)
        second = subprocess.run(
            [sys.executable, "-m", "ray_jobs.train", "--config", str(DEMO_CONFIG), *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert f"is being run right now by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        os.kill(first.pid, signal.SIGKILL)  # the driver alone, as a lost machine would
        first.wait()
    finally:
        kill_group(first)
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody told MLflow
    logged = steps(tracking_uri, run_id, FITNESS)

    assert cli_main(["runs", "clean", "--tracking-uri", tracking_uri]) == 0
    assert f"{run_id} 'twice'" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert f"pid {first.pid}" in run.data.tags[NOTE_TAG] and "is gone" in run.data.tags[NOTE_TAG]
    assert steps(tracking_uri, run_id, FITNESS) == logged
    assert cli_main(["runs", "clean", "--tracking-uri", tracking_uri]) == 0
    assert "0 run(s) marked KILLED" in capsys.readouterr().out


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_study_leaves_no_run_running(stop, longer_epochs_root, tmp_path):
    """Ctrl-C (which Tune takes itself) and SIGTERM (`ray job stop`): exit 130 with one line, every run KILLED."""
    overrides = cli_overrides(
        longer_epochs_root,
        tmp_path,
        "tune.num_samples=4",
        "tune.max_concurrent_trials=1",
        "run_name=cut-short",
        "tune.scheduler=none",
        "tune.search=optuna-cmaes",
    )
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start_in_session("tuning.tune", overrides)
    try:
        deadline = time.monotonic() + 300
        parent = None
        while time.monotonic() < deadline:  # a trial is training (its first epoch is in MLflow)
            parent = parent or find_run(tracking_uri, "faults", "cut-short", kind="study")
            children = child_runs(tracking_uri, parent.info.run_id) if parent else []
            if any(steps(tracking_uri, c.info.run_id, FITNESS) for c in children):
                break
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.5)
        process.send_signal(stop)
        output = finish(process, timeout=180)
    finally:
        kill_group(process)
    assert process.returncode == 130, output[-4000:]
    ours = [line for line in output.splitlines() if not RAY_LOG_LINE.match(line)]  # not forwarded from Ray's actors
    assert "interrupted" in output and not [line for line in ours if "Traceback" in line or "SIGTERM received" in line]
    client = MlflowClient(tracking_uri)
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    statuses = [run.info.status for run in child_runs(tracking_uri, parent.info.run_id)]
    assert statuses and "RUNNING" not in statuses, statuses
