"""Faults injected into real Ray training runs, each checked against the MLflow run's history:

(a) a Train worker process killed in the middle of an epoch: Ray Train restarts the workers from the
    last checkpoint and the run finishes with every epoch logged once;
(b) a node of a local multi-node cluster removed mid-run: the run recovers on a replacement node, and
    without one it fails with a message naming the lost node;
(c) the driver stopped with Ctrl-C and the same command rerun: it resumes the same MLflow run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from instseg.metrics.names import EPOCH, FITNESS
from ray_jobs.train import run_training
from ray_jobs.train_loop import NODES_TAG, RESUMED_TAG
from tests.helpers import (
    DEMO_CONFIG,
    EPOCHS,
    RAY_LOG_LINE,
    ROOT,
    assert_one_point_per_epoch,
    cli_overrides,
    ensure_auth_token,
    finish,
    steps,
    wait_for_epoch,
)

pytestmark = pytest.mark.integration


def start_driver(overrides: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.train", "--config", str(DEMO_CONFIG), *overrides],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_worker_killed_mid_epoch_restores_from_last_checkpoint(local_ray, longer_epochs_root, tmp_path):
    from ray.util.state import list_actors

    from instseg.config import load, resolve_paths

    cfg = resolve_paths(
        load(DEMO_CONFIG, cli_overrides(longer_epochs_root, tmp_path, "ray.max_failures=1", "run_name=killed-worker"))
    )
    tracking_uri = cfg.tracking.uri
    killed: dict[str, int] = {}

    def kill_a_worker_in_epoch_two() -> None:
        wait_for_epoch(tracking_uri, "killed-worker", 1)  # epoch 1's checkpoint is registered: epoch 2 is running
        time.sleep(1.0)
        # this test's own Ray, by address: without one the state API looks up "the" local cluster, which a stale
        # record of another instance on the machine can point elsewhere (a GCS timeout in the thread)
        (worker,) = list_actors(
            address=local_ray.get_runtime_context().gcs_address,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        )
        killed["pid"] = worker.pid
        os.kill(worker.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_in_epoch_two, daemon=True)
    killer.start()
    summary = run_training(cfg)
    killer.join(timeout=10)

    assert killed, "the worker was never killed"
    run = MlflowClient(tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RESUMED_TAG] == "1"  # restarted once, from the checkpoint of epoch 1
    assert summary.metrics[EPOCH] == EPOCHS
    assert_one_point_per_epoch(tracking_uri, summary.run_id)
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)


def test_c_driver_stopped_and_rerun_resumes_the_same_mlflow_run(longer_epochs_root, tmp_path):
    overrides = cli_overrides(longer_epochs_root, tmp_path, "run_name=stopped-driver", "ray.checkpoints_to_keep=1")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = start_driver(overrides)
    run_id = wait_for_epoch(tracking_uri, "stopped-driver", 1, process=first)
    first.send_signal(signal.SIGINT)  # Ctrl-C while epoch 2 trains
    output = finish(first, timeout=120)
    assert first.returncode == 130, output[-3000:]
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "KILLED"
    done = steps(tracking_uri, run_id, FITNESS)
    assert done and done[-1] < EPOCHS

    second = start_driver(overrides)
    output = finish(second)
    assert second.returncode == 0, output[-3000:]
    assert f"resuming MLflow run {run_id}" in output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RESUMED_TAG] == str(done[-1])
    assert_one_point_per_epoch(tracking_uri, run_id)
    # kept: the best checkpoint by fitness (checkpoints_to_keep=1) and the latest
    fitness = {m.step: m.value for m in client.get_metric_history(run_id, FITNESS)}
    kept = {int(p.name.split("_")[1]) for p in (tmp_path / "ray_results" / "stopped-driver").glob("epoch_*")}
    assert EPOCHS in kept and len(kept) <= 2 and max(fitness[e] for e in kept) == max(fitness.values()), (kept, fitness)

    # the finished name is not trained over: a clear message and exit status 2
    third = start_driver(overrides)
    output = finish(third, timeout=120)
    assert third.returncode == 2 and f"run_name 'stopped-driver' already finished (MLflow run {run_id})" in output


@pytest.fixture
def multinode_cluster(monkeypatch):
    """A head with no CPUs (driver and Train controller) and two 1-CPU worker nodes, on 127.0.0.1:
    two 1-CPU Train workers can only run one per node."""
    from ray.cluster_utils import Cluster

    # restarts of the worker group wait this long for room before counting as a failed start
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    ensure_auth_token()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _remove_worker_node(cluster, tracking_uri: str, run_id: str):
    """Remove the node that rank 1 runs on (per the run's tag) and return its node id."""
    nodes = MlflowClient(tracking_uri).get_run(run_id).data.tags[NODES_TAG].split(",")
    assert len(set(nodes)) == 2, f"the two workers share a node: {nodes}"
    (victim,) = [node for node in cluster.worker_nodes if node.node_id == nodes[1]]
    cluster.remove_node(victim, allow_graceful=False)
    return victim.node_id


@pytest.mark.slow
def test_b_node_removed_mid_run_recovers_on_a_new_node_or_fails_naming_it(
    multinode_cluster, longer_epochs_root, tmp_path
):
    cluster = multinode_cluster
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"ray.address={cluster.address}", "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.max_failures=1"]

    # resources allow: a replacement node joins after the loss and the run finishes
    recovering = start_driver(cli_overrides(longer_epochs_root, tmp_path, *common, "run_name=node-lost-replaced"))
    run_id = wait_for_epoch(tracking_uri, "node-lost-replaced", 1, process=recovering)
    lost = _remove_worker_node(cluster, tracking_uri, run_id)
    replacement = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    output = finish(recovering)
    assert recovering.returncode == 0, output[-3000:]
    run = MlflowClient(tracking_uri).get_run(run_id)
    # the rank restarted on the new node restored the checkpoint of epoch 1 from the storage every node sees (the
    # driver checked that on all three nodes before it started: ray_jobs.shared_paths)
    assert run.info.status == "FINISHED" and run.data.tags[RESUMED_TAG] == "1"
    assert lost not in run.data.tags[NODES_TAG] and replacement.node_id in run.data.tags[NODES_TAG]
    assert_one_point_per_epoch(tracking_uri, run_id)

    # resources don't allow: no replacement, and the message names the lost node
    failing = start_driver(
        cli_overrides(longer_epochs_root, tmp_path, *common, "ray.max_startup_failures=0", "run_name=node-lost")
    )
    run_id = wait_for_epoch(tracking_uri, "node-lost", 1, process=failing)
    lost = _remove_worker_node(cluster, tracking_uri, run_id)
    output = finish(failing)
    assert failing.returncode == 1, output[-3000:]
    error = [line for line in output.splitlines() if line.startswith("instseg: error: ")]
    assert error and lost in error[-1] and "rerun with run_name=node-lost" in error[-1], output[-3000:]
    print(error[-1])  # shown with pytest -rP
    # the driver ends on that line, not on a traceback (Ray's forwarded worker logs, "(pid=...) ...", aside)
    driver_lines = [line for line in output.split(error[-1])[-1].splitlines() if not RAY_LOG_LINE.match(line)]
    assert not any("Traceback" in line for line in driver_lines), output[-3000:]
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FAILED"
