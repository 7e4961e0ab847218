"""build_trainer: the ONE place a TorchTrainer is built (plain training and every Tune trial)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from instseg.config import Config
from instseg.data.coco import dataset_fingerprint
from instseg.data.loaders import build_datasets
from instseg.metrics.names import FITNESS, FITNESS_MODE
from instseg.models.bundle import bundle_from_checkpoint
from instseg.tracking.runs import RunLogger, create_run
from ray_jobs.train_loop import train_loop_per_worker

BUNDLE_ARTIFACT_PATH = "bundle"
# Train V2 routes every worker print() to its logger and also to stdout, which doubles our progress
# lines and defeats contextlib.redirect_stdout around pycocotools' chatter: keep print as print.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass
class TrainSummary:
    """What a training run hands to the next stage."""

    run_id: str
    tracking_uri: str
    checkpoint_path: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    bundle_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preflight_data(cfg: Config) -> None:
    """Open both splits in the driver (annotations and file existence, no decoding) so that a missing
    or broken dataset stops with its problems before any Ray worker starts."""
    build_datasets(cfg.data)


def create_driver_run(cfg: Config, tracking_uri: str, name: str, kind: str) -> str:
    """The MLflow run a driver (train entry point, tuning study) owns, tagged with its data."""
    splits = (cfg.data.train_split, cfg.data.val_split)
    return create_run(
        tracking_uri,
        cfg.tracking.experiment,
        run_name=name,
        tags={"instseg.kind": kind, "instseg.dataset_fingerprint": dataset_fingerprint(cfg.data.root, splits)},
    )


def build_trainer(cfg: Config, *, tracking_uri: str, run_id: str, name: str, callbacks: list | None = None) -> TorchTrainer:
    """cfg must have absolute paths (config.resolve_paths): workers run in another directory."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(), "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=None if cfg.ray.use_gpu else {"CPU": cfg.ray.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=cfg.ray.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.ray.checkpoints_to_keep,
                checkpoint_score_attribute=FITNESS,
                checkpoint_score_order=FITNESS_MODE,
            ),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
    )


def log_checkpoint_bundle(logger: RunLogger, checkpoint: ray.train.Checkpoint) -> str:
    """Log the weights + config bundle of `checkpoint` to the run; returns its runs:/ URI."""
    with tempfile.TemporaryDirectory(prefix="instseg-bundle-") as tmp:
        local = checkpoint.to_directory(str(Path(tmp) / "checkpoint"))
        bundle = bundle_from_checkpoint(local, Path(tmp) / BUNDLE_ARTIFACT_PATH)
        for file in bundle.iterdir():
            logger.log_artifact(file, BUNDLE_ARTIFACT_PATH)
    return f"runs:/{logger.run_id}/{BUNDLE_ARTIFACT_PATH}"


def fit_and_log(trainer: TorchTrainer, tracking_uri: str, run_id: str) -> TrainSummary:
    """Run `trainer`; log the best checkpoint's bundle and close the MLflow run with the outcome."""
    logger = RunLogger(tracking_uri, run_id)
    try:
        result = trainer.fit()
    except BaseException:
        logger.finish("FAILED")
        raise
    best = result.get_best_checkpoint(FITNESS, FITNESS_MODE) if result.best_checkpoints else result.checkpoint
    bundle_uri = log_checkpoint_bundle(logger, best) if best is not None else None
    logger.set_tags({"instseg.best_checkpoint": best.path if best else "none"})
    logger.finish("FINISHED")
    return TrainSummary(
        run_id=run_id,
        tracking_uri=tracking_uri,
        checkpoint_path=best.path if best else None,
        metrics=dict(result.metrics or {}),
        bundle_uri=bundle_uri,
    )
