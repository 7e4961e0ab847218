"""Serve the tune -> register -> promote flow on a schedule (cron, interval or RRule).

    prefect server start                                   # or PREFECT_API_URL of your server
    instseg flow deploy --config configs/demo.yaml --cron "0 3 * * *" [key=value ...]   # or python -m flows.deploy

Scheduled runs execute in this process's runner. Ray: `--ray-address` (or RAY_ADDRESS) joins a
cluster; without one each flow run starts a private local Ray instance.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from prefect_ray import RayTaskRunner

from flows.pipeline import tune_register_promote
from instseg.cli import parse_command
from instseg.config import load
from instseg.errors import ConfigError
from instseg.redaction import redact
from ray_jobs.cli_common import run_cli

DEPLOYMENT_NAME = "instseg-scheduled-tuning"


def flow_on_ray(ray_address: str | None = None) -> Any:
    """The flow with its RayTaskRunner pointed at a cluster, or at a new local instance per run
    (a bare ray.init() would join whatever cluster `ray start --head` recorded last)."""
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    return tune_register_promote.with_options(task_runner=RayTaskRunner(address=address))


def build_deployment(
    config_path: str,
    overrides: Sequence[str] = (),
    *,
    cron: str | None = None,
    interval_minutes: float | None = None,
    rrule: str | None = None,
    ray_address: str | None = None,
    name: str = DEPLOYMENT_NAME,
) -> Any:
    """A RunnerDeployment of the flow with exactly one schedule; the config is checked now, not at 3 am."""
    if sum(x is not None for x in (cron, interval_minutes, rrule)) != 1:
        raise ConfigError("give exactly one schedule: --cron, --interval-minutes or --rrule")
    config_file = str(Path(config_path).resolve())
    load(config_file, list(overrides))
    secret = next((o for o in overrides if redact(o) != o), None)
    if secret is not None:
        raise ConfigError(
            f"override '{redact(secret)}' holds credentials, and Prefect stores a deployment's parameters: give "
            "them to the process that serves the flow instead (MLFLOW_TRACKING_URI, or MLFLOW_TRACKING_USERNAME / "
            "_PASSWORD)"
        )
    return flow_on_ray(ray_address).to_deployment(
        name=name,
        cron=cron,
        interval=timedelta(minutes=interval_minutes) if interval_minutes is not None else None,
        rrule=rrule,
        parameters={"config_path": config_file, "overrides": list(overrides)},
        tags=["instseg"],
    )


def deploy_command(args: argparse.Namespace) -> int:
    """`instseg flow deploy`: serve the flow on the schedule given, in this process."""
    if args.config is None:
        raise ConfigError("--config is required for a deployment")
    deployment = build_deployment(
        args.config, args.overrides, cron=args.cron, interval_minutes=args.interval_minutes, rrule=args.rrule, ray_address=args.ray_address
    )
    from prefect import serve

    serve(deployment)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.deploy ARGS` = `instseg flow deploy ARGS`."""
    return deploy_command(parse_command(["flow", "deploy"], argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
