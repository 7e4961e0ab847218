"""`ray job submit` against a local head with token authentication (the Ray 2.59+ default): training
runs end to end when the token travels with the submission, and a submission without it is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from instseg.cli import main as cli_main
from instseg.metrics.names import EPOCH, FITNESS
from ray_jobs.submit import load_runtime_env, submit_job
from tests.helpers import DEMO_CONFIG, RAY_CLI, ROOT, ensure_auth_token, isolated_overrides
from tests.servers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def token_head():
    """A one-node cluster with its dashboard (the job server) on 127.0.0.1 and token auth on."""
    from ray.cluster_utils import Cluster

    token = ensure_auth_token()
    cluster = Cluster(
        initialize_head=True,
        # the job agent's port must differ from the session's local Ray (whose agent holds the default)
        head_node_args={
            "num_cpus": 2,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": 0,
            "dashboard_agent_listen_port": free_port(),
        },
    )
    url = cluster.webui_url if "://" in cluster.webui_url else f"http://{cluster.webui_url}"
    # the first job waits for the head's job agent to come up (submit_job retries until it has)
    warm_up = submit_job([sys.executable, "-c", "pass"], address=url, token=token, on_line=None)
    assert warm_up.succeeded, warm_up.message
    yield url, token
    cluster.shutdown()


def test_token_authenticated_job_trains_end_to_end(token_head, synth_root, tmp_path):
    address, token = token_head
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    entrypoint = [
        sys.executable,
        "-m",
        "instseg",
        "train",
        "--config",
        str(DEMO_CONFIG.relative_to(ROOT)),
        *isolated_overrides(synth_root, tmp_path),
        "train.epochs=1",
        "train.log_every=2",
        "run_name=job-train",
        "--register",
        "job-model",
    ]
    lines: list[str] = []
    # the project folder travels as the job's working_dir, as with `ray job submit --working-dir .`
    runtime_env = load_runtime_env(str(ROOT / "cluster" / "runtime_env.yaml"), str(ROOT))
    runtime_env.pop("pip")  # the test venv already has them; the cluster's Python is this one
    outcome = submit_job(entrypoint, address=address, runtime_env=runtime_env, token=token, on_line=lines.append)

    assert outcome.status == "SUCCEEDED", "\n".join(lines[-60:])
    # the job's logs were followed; they are not a terminal: plain progress lines, then the epoch table, and none
    # of Ray Train's INFO chatter
    assert any("epoch 1/1  step 2/" in line and "img/s" in line for line in lines), "\n".join(lines[-60:])
    assert any("Mask(P" in line for line in lines)
    assert not [line for line in lines if "Reporting training result" in line or "Checkpoint successfully" in line]
    run = MlflowClient(tracking_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "job-train"
    assert outcome.summary["run_id"] == outcome.run_id and outcome.summary["metrics"][EPOCH] == 1
    assert FITNESS in run.data.metrics
    # --register: the run's model is the registered model's first version, its challenger
    version = MlflowClient(tracking_uri).get_model_version_by_alias("job-model", "challenger")
    assert str(version.version) == "1" and version.run_id == outcome.run_id
    assert any("registered as job-model version 1 (challenger)" in line for line in lines)


def test_a_job_given_relative_paths_stops_at_once_saying_what_to_pass(token_head):
    """The README's old example: inside a job, data/synth resolved against the job's copy of the working
    directory, which leaves data/ out; the job now stops in its first seconds with the fix in one line."""
    address, token = token_head
    runtime_env = load_runtime_env(str(ROOT / "cluster" / "runtime_env.yaml"), str(ROOT))
    runtime_env.pop("pip")
    lines: list[str] = []
    entrypoint = [sys.executable, "-m", "instseg", "train", "--config", str(DEMO_CONFIG.relative_to(ROOT))]
    outcome = submit_job(entrypoint, address=address, runtime_env=runtime_env, token=token, on_line=lines.append)
    assert outcome.status == "FAILED" and outcome.run_id is None
    refusal = [line for line in lines if line.startswith("instseg: error: data.root 'data/synth' is relative")]
    assert refusal and "data.root=$PWD/data/synth" in refusal[0], "\n".join(lines[-30:])


def test_our_local_instance_finds_itself_beside_another_cluster(token_head, local_ray):
    """Ray Train's PlacementGroupCleaner asks Ray's state API, with no address, whether the controller still
    lives. Beside another instance (token_head here) that lookup failed ("multiple active Ray instances") or
    asked the other cluster, which knows no such actor, so the cleaner thought our controller dead."""

    @local_ray.remote(num_cpus=0)
    class Probe:
        def my_state(self) -> str | None:
            from ray.util.state import get_actor

            found = get_actor(local_ray.get_runtime_context().get_actor_id(), timeout=30)
            return found.state if found else None

    assert local_ray.get(Probe.remote().my_state.remote()) == "ALIVE"


def test_job_status_says_how_a_job_ended(token_head, capsys):
    address, token = token_head
    outcome = submit_job([sys.executable, "-c", "import sys; sys.exit(3)"], address=address, token=token, on_line=None)
    assert outcome.status == "FAILED"
    assert cli_main(["job", "status", outcome.job_id, "--address", address]) == 0
    assert capsys.readouterr().out.startswith(f"{outcome.job_id} FAILED")


def test_job_submission_without_the_token_is_refused(token_head):
    address, token = token_head
    command = [RAY_CLI, "job", "submit", "--address", address, "--no-wait", "--", "python", "-c", "print('hello')"]
    without = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    refused = subprocess.run(
        command, env={**without, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "401" in refused.stderr + refused.stdout or "uthenticat" in refused.stderr + refused.stdout, refused.stderr[
        -2000:
    ]

    # the same command with the token (what the README shows) is accepted
    accepted = subprocess.run(
        command, env={**without, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120
    )
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert "submitted successfully" in accepted.stdout + accepted.stderr


def test_the_cluster_flow_runs_the_study_as_a_job_and_promotes_its_best_trial(token_head, synth_root, tmp_path):
    """flows.cluster on a real Prefect test server: the study is a Ray job on the token-auth head (the token from
    a Prefect Secret block), its MLflow parent run comes back in the job's summary, and the best trial is
    registered and promoted from there."""
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    from flows.cluster import tune_on_cluster

    address, token = token_head
    overrides = [
        *isolated_overrides(synth_root, tmp_path),
        "train.epochs=1",
        "tune.num_samples=1",
        "tune.scheduler=none",
        "registry.model_name=cluster-model",
        "run_name=cluster-study",
    ]
    runtime_env = load_runtime_env(str(ROOT / "cluster" / "runtime_env.yaml"), str(ROOT))
    runtime_env.pop("pip")  # the test venv already has them; the cluster's Python is this one
    with prefect_test_harness(server_startup_timeout=120):
        Secret(value=token).save("ray-token")
        result = tune_on_cluster(
            str(DEMO_CONFIG.relative_to(ROOT)),
            address,
            overrides,
            runtime_env=runtime_env,
            token_secret="ray-token",
            python=sys.executable,
        )

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    study = client.get_run(result["tune"]["parent_run_id"])
    assert study.info.run_name == "cluster-study" and study.info.status == "FINISHED"
    version = client.get_model_version("cluster-model", result["registration"]["version"])
    assert version.run_id == result["tune"]["best_run_id"] and version.tags["study_run_id"] == study.info.run_id
    assert result["promotion"]["promoted"] and result["promotion"]["champion_after"] == str(version.version)
