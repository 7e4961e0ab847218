"""Runs never stay in a false state, against a real sqlite MLflow store: a RUNNING run whose driver is gone
is marked KILLED (a live one is left alone and its run_name refused), registering a model leaves the
training run's status as it was, and an unreachable tracking server is named within seconds."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from instseg.errors import ConfigError
from instseg.tracking.liveness import (
    HEARTBEAT_TAG,
    HOST_TAG,
    NOTE_TAG,
    PID_TAG,
    STARTED_TAG,
    check_no_live_driver,
    close_orphaned_runs,
    driver_alive,
    driver_tags,
)
from instseg.tracking.registry import register_bundle
from instseg.tracking.runs import check_tracking_reachable, create_run


def _dead_driver() -> dict[str, str]:
    """The driver tags of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    tags = {**driver_tags(), PID_TAG: str(child.pid)}
    child.wait()
    return tags


def test_orphaned_runs_are_marked_killed_and_live_ones_left_alone(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    orphan = create_run(uri, "exp", run_name="orphan", tags={**_dead_driver(), "instseg.kind": "train"})
    live = create_run(uri, "exp", run_name="live", tags={**driver_tags(), "instseg.kind": "train"})
    remote_stale = create_run(
        uri,
        "exp",
        run_name="remote",
        tags={HOST_TAG: "elsewhere", PID_TAG: "1", STARTED_TAG: "0", HEARTBEAT_TAG: f"{time.time() - 3600:.0f}"},
    )
    untagged = create_run(uri, "exp", run_name="old-version")
    # a trial run on another machine carries its study driver's tags but beats through its parent, the study
    remote = {HOST_TAG: "elsewhere", PID_TAG: "1", STARTED_TAG: "0"}
    study = create_run(uri, "exp", run_name="study", tags={**remote, HEARTBEAT_TAG: f"{time.time():.0f}"})
    trial = create_run(uri, "exp", run_name="trial", parent_run_id=study, tags=remote)
    closed = {run_id for run_id, _, _ in close_orphaned_runs(uri, ["exp"])}
    assert closed == {orphan, remote_stale}
    assert MlflowClient(uri).get_run(trial).info.status == "RUNNING", "its study's heartbeat is fresh"
    client = MlflowClient(uri)
    assert client.get_run(orphan).info.status == "KILLED" and "is gone" in client.get_run(orphan).data.tags[NOTE_TAG]
    assert client.get_run(live).info.status == "RUNNING" and client.get_run(untagged).info.status == "RUNNING"
    with pytest.raises(ConfigError, match="is being run right now by pid"):
        check_no_live_driver(client.get_run(live), "live")
    check_no_live_driver(client.get_run(orphan), "orphan")  # a dead driver's run may be resumed


def test_a_reused_pid_is_not_the_driver():
    tags = {**driver_tags(), STARTED_TAG: "12.00"}  # this pid, but a process that started at another time
    assert driver_alive(tags) is False
    assert driver_alive(driver_tags()) is True
    assert driver_alive({}) is None


def test_registering_never_changes_the_training_runs_status(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = create_run(uri, "exp", run_name="trained")
    MlflowClient(uri).set_terminated(run_id, "FINISHED")
    with pytest.raises(Exception):
        register_bundle(uri, run_id, tmp_path / "no-such-bundle", "model")
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_an_unreachable_tracking_server_is_named_within_seconds():
    with pytest.raises(ConfigError, match=r"cannot reach the MLflow tracking server at http://\*\*\*@127.0.0.1:9"):
        check_tracking_reachable("http://alice:secret@127.0.0.1:9")  # the discard port: nothing listens
