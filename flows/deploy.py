"""Deploy the tune -> register -> promote flow on a schedule (cron, interval or RRule).

    prefect server start                                   # or PREFECT_API_URL of your server
    instseg flow deploy --config configs/demo.yaml --cron "0 3 * * *" [key=value ...]   # or python -m flows.deploy
    prefect worker start --pool instseg-process            # on the machine that runs the studies

`instseg flow deploy` creates (if missing) the `process` work pool and the global concurrency limit `gpu` (one
study trains at a time per slot), then registers the deployment; a Prefect worker on that pool runs the flow
from this folder when it is due. `prefect.yaml` declares the same deployment for `prefect deploy`.
`--serve` instead runs the schedule in this process (no pool, no worker). Ray: `--ray-address` (or
RAY_ADDRESS in the worker's environment) joins a cluster; without one each flow run starts a private local
Ray instance.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Sequence
from uuid import UUID

import httpx
from prefect.deployments.runner import EntrypointType

from flows.pipeline import GPU_LIMIT, LocalOrClusterRayTaskRunner, tune_register_promote
from instseg.cli import parse_command
from instseg.config import load
from instseg.errors import ConfigError, InstsegError, first_line
from instseg.redaction import redact
from ray_jobs.cli_common import run_cli

DEPLOYMENT_NAME = "instseg-scheduled-tuning"
WORK_POOL = "instseg-process"
PROJECT_DIR = Path(__file__).resolve().parents[1]  # what a worker runs the flow from


def make_schedule(
    cron: str | None = None,
    interval_minutes: float | None = None,
    rrule: str | None = None,
    start: datetime | None = None,
) -> Any:
    """Exactly one of cron, interval (first run at `start`, when given) or RFC 5545 rrule."""
    from prefect.schedules import Cron, Interval, RRule

    if sum(x is not None for x in (cron, interval_minutes, rrule)) != 1:
        raise ConfigError("give exactly one schedule: --cron, --interval-minutes or --rrule")
    try:
        if cron is not None:
            return Cron(cron)
        if rrule is not None:
            return RRule(rrule)
    except ValueError as exc:
        option = "--cron" if cron is not None else "--rrule"
        raise ConfigError(f"{option} {cron or rrule!r}: {first_line(exc)}") from None
    if interval_minutes <= 0:
        raise ConfigError(f"--interval-minutes must be positive (got {interval_minutes})")
    return Interval(timedelta(minutes=interval_minutes), anchor_date=start)


def deployment_parameters(config_path: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The flow's parameters, checked now rather than at 3 am: the config loads, and no override carries
    credentials (Prefect stores a deployment's parameters)."""
    config_file = str(Path(config_path).resolve())
    load(config_file, list(overrides))
    secret = next((o for o in overrides if redact(o) != o), None)
    if secret is not None:
        raise ConfigError(
            f"override '{redact(secret)}' holds credentials, and Prefect stores a deployment's parameters: give "
            "them to the process that runs the flow instead (MLFLOW_TRACKING_URI, or MLFLOW_TRACKING_USERNAME / "
            "_PASSWORD)"
        )
    return {"config_path": config_file, "overrides": list(overrides)}


def flow_on_ray(ray_address: str | None = None) -> Any:
    """The flow, its task runner joining `ray_address` when given (else RAY_ADDRESS or a private local Ray)."""
    if not ray_address:
        return tune_register_promote
    return tune_register_promote.with_options(task_runner=LocalOrClusterRayTaskRunner(address=ray_address))


def build_deployment(
    config_path: str,
    overrides: Sequence[str] = (),
    *,
    schedule: Any,
    ray_address: str | None = None,
    name: str = DEPLOYMENT_NAME,
) -> Any:
    """A RunnerDeployment served by this process (`--serve`)."""
    parameters = deployment_parameters(config_path, overrides)
    flow = flow_on_ray(ray_address)
    return flow.to_deployment(name=name, schedules=[schedule], parameters=parameters, tags=["instseg"])


async def ensure_pool_and_gpu_limit(pool: str, gpu_slots: int) -> None:
    """The `process` work pool and the global concurrency limit `gpu`, created when missing (existing ones are
    left as they are: their settings may have been tuned in the UI)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        try:
            await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            try:
                limit = GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpu_slots)
                await client.create_global_concurrency_limit(limit)
            except ObjectAlreadyExists:
                pass  # created meanwhile


def deploy_to_pool(
    config_path: str,
    overrides: Sequence[str] = (),
    *,
    schedule: Any,
    pool: str = WORK_POOL,
    gpu_slots: int = 1,
    ray_address: str | None = None,
    name: str = DEPLOYMENT_NAME,
) -> UUID:
    """Register the deployment on `pool` (creating the pool and the `gpu` limit first); returns its id. A worker
    runs the flow from PROJECT_DIR; `ray_address` goes into the flow run's environment as RAY_ADDRESS."""
    parameters = deployment_parameters(config_path, overrides)
    if gpu_slots < 1:
        raise ConfigError(f"--gpu-slots must be at least 1 (got {gpu_slots})")
    try:
        asyncio.run(ensure_pool_and_gpu_limit(pool, gpu_slots))
    except (httpx.ConnectError, httpx.TimeoutException) as exc:
        from prefect.settings import PREFECT_API_URL

        raise InstsegError(
            f"the Prefect API at {redact(str(PREFECT_API_URL.value() or 'its default'))} does not answer "
            f"({first_line(exc)}): start one with `prefect server start`, or set PREFECT_API_URL"
        ) from None
    return tune_register_promote.deploy(
        name=name,
        work_pool_name=pool,
        schedules=[schedule],
        parameters=parameters,
        job_variables={"working_dir": str(PROJECT_DIR), "env": {"RAY_ADDRESS": ray_address} if ray_address else {}},
        tags=["instseg", "tuning"],
        description="Tune, register the best trial's model, promote it if it beats the champion",
        build=False,
        push=False,
        entrypoint_type=EntrypointType.MODULE_PATH,  # FLOW_ENTRYPOINT
        print_next_steps=False,
        ignore_warnings=True,
    )


def deploy_command(args: argparse.Namespace) -> int:
    """`instseg flow deploy`: a deployment on a work pool (or, with --serve, served by this process)."""
    if args.config is None:
        raise ConfigError("--config is required for a deployment")
    schedule = make_schedule(args.cron, args.interval_minutes, args.rrule)
    if args.serve:
        from prefect import serve

        serve(build_deployment(args.config, args.overrides, schedule=schedule, ray_address=args.ray_address))
        return 0
    pool = args.pool or WORK_POOL
    deployment_id = deploy_to_pool(
        args.config,
        args.overrides,
        schedule=schedule,
        pool=pool,
        gpu_slots=args.gpu_slots,
        ray_address=args.ray_address,
    )
    print(
        f"deployment {tune_register_promote.name}/{DEPLOYMENT_NAME} ({deployment_id}) on work pool {pool}; "
        f"start a worker: prefect worker start --pool {pool}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.deploy ARGS` = `instseg flow deploy ARGS`."""
    return deploy_command(parse_command(["flow", "deploy"], argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
