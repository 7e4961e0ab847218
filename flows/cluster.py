"""The tune -> register -> promote flow for a Prefect worker that is not on the Ray cluster: the study runs as a
Ray job (ray_jobs.submit.submit_job), followed to its end; the job's summary (its MLflow parent run and best
trial) goes on to registration and promotion, which run where the flow runs.

The cluster's token comes from a Prefect Secret block (`token_secret`, its name) or, without one, from the
environment (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token with RAY_AUTH_MODE=token). The study holds
the `gpu` concurrency slot while it trains, as in flows.pipeline.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency

from flows.pipeline import GPU_LIMIT, TUNE_TIMEOUT_S, promote_task, register_task
from instseg.config import load, resolve_paths
from instseg.errors import InstsegError
from ray_jobs.submit import submit_job

CLUSTER_FLOW_NAME = "instseg-tune-on-cluster"


class StudyJobFailed(InstsegError):
    exit_code = 1


@task(name="tune-as-ray-job", timeout_seconds=TUNE_TIMEOUT_S)
def tune_job_task(
    entrypoint: list[str], address: str, runtime_env: dict[str, Any] | None, token_secret: str | None
) -> dict[str, Any]:
    """Submit the study, stream its log lines into the flow's logs, return its TuneSummary (as a dict)."""
    token = None
    if token_secret:
        from prefect.blocks.system import Secret

        token = Secret.load(token_secret).get()
    logger = get_run_logger()
    outcome = submit_job(entrypoint, address=address, runtime_env=runtime_env, token=token, on_line=logger.info)
    if not outcome.succeeded or not outcome.summary:
        raise StudyJobFailed(f"study job {outcome.job_id} ended {outcome.status}: {outcome.message or 'no summary'}")
    logger.info("study job %s: MLflow parent run %s", outcome.job_id, outcome.run_id)
    return outcome.summary


@flow(name=CLUSTER_FLOW_NAME, log_prints=True)
def tune_on_cluster(
    config_path: str,
    address: str,
    overrides: list[str] | None = None,
    runtime_env: dict[str, Any] | None = None,
    token_secret: str | None = None,
    python: str = "python",
) -> dict[str, Any]:
    """`config_path` as the job sees it (relative to the runtime env's working_dir, or absolute on the cluster);
    it is also loaded here, for registration and promotion, so the overrides should name paths both sides read
    (shared storage, an MLflow server)."""
    overrides = list(overrides or [])
    cfg = resolve_paths(load(config_path, overrides))  # a bad config fails here, before a job is submitted
    entrypoint = [python, "-m", "instseg", "tune", "--config", config_path, *overrides]
    config = cfg.model_dump()
    with concurrency(GPU_LIMIT, occupy=1):
        tuned = tune_job_task(entrypoint, address, runtime_env, token_secret)
    registered = register_task(config, tuned)
    promoted = promote_task(config, registered)
    return {"tune": tuned, "registration": registered, "promotion": promoted}
