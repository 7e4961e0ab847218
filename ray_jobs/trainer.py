"""build_trainer: the ONE place a TorchTrainer is built (plain training and every Tune trial)."""

from __future__ import annotations

import sys
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from instseg.config import Config
from instseg.metrics.names import FITNESS, FITNESS_MODE
from ray_jobs.epoch_logger import EpochMetricsLogger
from ray_jobs.train_loop import train_loop_per_worker

# Train V2 routes every worker print() to its logger and also to stdout, which doubles our progress
# lines and defeats contextlib.redirect_stdout around pycocotools' chatter: keep print as print.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Ray Train's INFO lines (each report's whole metrics dict, checkpoint paths, worker-group start) repeat what our
# table says; its warnings and errors still show
RAY_TRAIN_LOG_LEVEL = "WARNING"


def scaling_config(cfg: Config) -> ray.train.ScalingConfig:
    """Workers and what each reserves: ray.cpus_per_worker CPUs, and on GPUs ray.gpus_per_worker of one
    (fractional: trials side by side on one GPU)."""
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return ray.train.ScalingConfig(
        num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
    )


def progress_mode(setting: str) -> str:
    """train.progress as the workers use it: "auto" is a bar when this driver prints to a terminal, else lines."""
    if setting != "auto":
        return setting
    return "bar" if sys.stdout.isatty() else "lines"


def build_trainer(
    cfg: Config,
    *,
    run_id: str,
    name: str,
    callbacks: list | None = None,
    start_from: dict[str, Any] | None = None,
    prepared: dict[str, Any] | None = None,
) -> TorchTrainer:
    """cfg must have absolute paths (config.resolve_paths): workers run in another directory.

    The same `name` and storage path restore the latest checkpoint (Ray Train's run snapshot); a run of a new
    name starts from `start_from` when given (see train_loop_per_worker); `callbacks` run after the per-epoch
    MLflow logger (ray_jobs.epoch_logger); `prepared` is what the driver's preflight found (annotation index
    folders, the dataset's fingerprint), taken by every worker as it is instead of reading the data again."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(),
            "run_id": run_id,
            "progress": progress_mode(cfg.train.progress),
            "start_from": start_from,
            "prepared": prepared or {},
        },
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=cfg.ray.storage_path,
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.ray.max_failures, controller_failure_limit=cfg.ray.max_startup_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.ray.checkpoints_to_keep,
                checkpoint_score_attribute=FITNESS,
                checkpoint_score_order=FITNESS_MODE,
            ),
            callbacks=[EpochMetricsLogger(cfg.tracking.uri, run_id, cfg.train.epochs), *(callbacks or [])],
            worker_runtime_env={"env_vars": WORKER_ENV},
            logging_config=ray.train.LoggingConfig(log_level=RAY_TRAIN_LOG_LEVEL),
        ),
    )
