"""Train once on Ray Train: `instseg train` (`python -m ray_jobs.train` is its alias).

    instseg train --config configs/demo.yaml [key=value ...]
    instseg job submit --address http://HEAD:8265 --working-dir . -- python -m instseg train --config configs/demo.yaml

Without a cluster address (ray.address, RAY_ADDRESS) it runs on a private local Ray instance:
the single-GPU or CPU mode. Rerunning with the run_name of an unfinished run (stopped, crashed, or
failed after losing nodes) resumes it: the latest checkpoint and the same MLflow run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from instseg.cli import parse_command
from instseg.config import Config
from instseg.errors import InstsegError
from instseg.metrics.names import FITNESS
from instseg.redaction import redact
from instseg.tracking.liveness import Heartbeat
from ray_jobs.cli_common import load_config, run_cli
from ray_jobs.driver_run import TrainSummary, fit_and_log, open_train_run, preflight
from ray_jobs.runtime import init_ray
from ray_jobs.shared_paths import check_shared_paths
from ray_jobs.submit import print_result
from ray_jobs.trainer import build_trainer


def run_training(cfg: Config) -> TrainSummary:
    """cfg with absolute paths -> a finished MLflow run and its best checkpoint (Ray started if needed)."""
    prepared = preflight(cfg)
    init_ray(cfg.ray.address)
    check_shared_paths(cfg)  # on several nodes: every node sees the checkpoints and a sqlite store
    name = cfg.run_name or time.strftime("train-%Y%m%d-%H%M%S")
    run_id, resumed = open_train_run(cfg, name)
    print(
        f"{'resuming' if resumed else 'started'} MLflow run {run_id} '{name}' ({redact(cfg.tracking.uri)})", flush=True
    )
    trainer = build_trainer(cfg, run_id=run_id, name=name, prepared=prepared)
    try:
        with Heartbeat(cfg.tracking.uri, run_id):
            return fit_and_log(trainer, cfg, run_id)
    except KeyboardInterrupt:
        print(
            f"stopped; the same command with run_name={name} resumes from the latest checkpoint",
            file=sys.stderr,
            flush=True,
        )
        raise


def train_command(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    summary = run_training(cfg)
    fit = summary.metrics.get(FITNESS)
    print(
        f"run {summary.run_id} finished: {FITNESS} {fit if fit is None else round(fit, 5)}, "
        f"model bundle {summary.bundle_uri}"
    )
    if getattr(args, "register", None):
        register_trained(cfg, summary, args.register)
    print_result(summary.to_dict())
    return 0


def register_trained(cfg: Config, summary: TrainSummary, model_name: str) -> str:
    """`instseg train --register NAME`: the run's best checkpoint becomes NAME's next version (its challenger)."""
    from instseg.promotion import register_run  # the registry and model code: only a run that registers needs it

    if summary.bundle_uri is None:
        raise InstsegError(f"run {summary.run_id} saved no checkpoint: no model to register as {model_name}")
    tags = {"source": "instseg train", "run_name": cfg.run_name or "", FITNESS: summary.metrics.get(FITNESS)}
    version = register_run(cfg.tracking.uri, summary.run_id, model_name, tags=tags, bundle_uri=summary.bundle_uri)
    print(f"registered as {model_name} version {version} (challenger); `instseg promote {model_name}` runs the gate")
    return version


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ray_jobs.train ARGS` = `instseg train ARGS`."""
    return train_command(parse_command(["train"], argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
