"""The MLflow run a driver owns (the train entry point, a study, a trial): checked before Ray starts, opened or
resumed by name, and closed with the outcome of trainer.fit() and the best checkpoint's bundle."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray.train
from ray.train.torch import TorchTrainer

from instseg.config import Config
from instseg.data.coco import check_dataset_root, dataset_fingerprint
from instseg.data.loaders import build_datasets, prepare_indexes
from instseg.errors import ConfigError
from instseg.metrics.names import FITNESS, FITNESS_MODE
from instseg.models.bundle import bundle_from_checkpoint
from instseg.models.weights import check_weights_available
from instseg.redaction import redact
from instseg.tracking.liveness import check_no_live_driver, close_orphaned_runs, driver_tags
from instseg.tracking.pyfunc_model import BUNDLE_ARTIFACT
from instseg.tracking.runs import RunLogger, check_tracking_reachable, create_run, find_run
from ray_jobs.node_loss import TrainingFailed, alive_nodes, describe_node_loss

FINGERPRINT_TAG = "instseg.dataset_fingerprint"
BEST_CHECKPOINT_TAG = "instseg.best_checkpoint"  # the checkpoint whose bundle the run logged


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


def preflight(cfg: Config) -> dict[str, Any]:
    """Find or build both splits' annotation indexes and open the splits in the driver (validated annotations
    and file existence, no decoding), make sure the weights files are there and the tracking server answers, so
    that a missing or broken dataset, file or server stops with its problem in seconds, before any Ray worker
    starts. Returns what every worker and trial then takes as it is (build_trainer's `prepared`): "indexes"
    (split -> annotation index folder) and the dataset's "fingerprint"."""
    prepared = prepare_data(cfg, write=lambda line: print(line, flush=True))
    build_datasets(cfg.data, prepared["indexes"])
    check_weights_available(cfg.model)
    check_tracking_reachable(cfg.tracking.uri)
    return prepared


def prepare_data(cfg: Config, write: Callable[[str], None] | None = None) -> dict[str, Any]:
    """preflight's "indexes" and "fingerprint" alone (found in seconds once preflight built the indexes)."""
    check_dataset_root(cfg.data.root, (cfg.data.train_split, cfg.data.val_split))
    fingerprint = _fingerprint(cfg)  # first: one read of both splits answers each split's index lookup too
    return {"indexes": prepare_indexes(cfg.data, write), "fingerprint": fingerprint}


def create_driver_run(cfg: Config, name: str, kind: str) -> str:
    """The MLflow run a driver (train entry point, tuning study) owns, tagged with its data and with who the
    driver is (instseg.tracking.liveness)."""
    return create_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        run_name=name,
        tags={"instseg.kind": kind, FINGERPRINT_TAG: _fingerprint(cfg), **driver_tags()},
    )


def claim_run_name(cfg: Config, name: str, kind: str) -> Any | None:
    """Before a driver opens its run: refuse a run_name whose driver is alive, mark KILLED every run of the
    experiment whose driver is gone, and return the newest run of `kind` with that name (None if none)."""
    existing = find_run(cfg.tracking.uri, cfg.tracking.experiment, name, kind=kind) if cfg.run_name else None
    check_no_live_driver(existing, name)
    for run_id, run_name, note in close_orphaned_runs(cfg.tracking.uri, [cfg.tracking.experiment]):
        print(f"marked run {run_id} '{run_name}' KILLED: {note}", flush=True)
    return existing


def _fingerprint(cfg: Config) -> str:
    return dataset_fingerprint(cfg.data.root, (cfg.data.train_split, cfg.data.val_split))


def checkpoint_folders(cfg: Config, name: str) -> list[Path]:
    """The epoch checkpoints Ray Train keeps for run `name` (local storage only; [] for URIs)."""
    if "://" in cfg.ray.storage_path:
        return []
    return sorted(Path(cfg.ray.storage_path, name).glob("epoch_*"))


def open_train_run(cfg: Config, name: str) -> tuple[str, bool]:
    """(run id, resumed): a new MLflow run, or, when cfg.run_name names an unfinished training run,
    that run, reopened. Ray Train restores the latest checkpoint of the same name by itself, and
    the loop continues the run's history from there (ray_jobs.train_loop)."""
    existing = claim_run_name(cfg, name, kind="train")
    if existing is None:
        return create_driver_run(cfg, name, kind="train"), False
    check_resumable(cfg, existing, name)
    run_id = existing.info.run_id
    logger = RunLogger(cfg.tracking.uri, run_id)
    logged = logger.logged_steps(FITNESS)
    if logged and "://" not in cfg.ray.storage_path and not checkpoint_folders(cfg, name):
        raise ConfigError(
            f"run_name '{name}' has {max(logged)} epoch(s) in MLflow run {run_id} but no checkpoint under "
            f"{Path(cfg.ray.storage_path, name)}: it cannot resume without repeating logged epochs; "
            "choose a new run_name"
        )
    logger.reopen(driver_tags())
    return run_id, True


def check_resumable(cfg: Config, existing: Any, name: str) -> None:
    """ConfigError unless the unfinished run `existing` (found by run_name) can continue: not FINISHED, and
    trained on the data cfg.data.root holds now."""
    run_id = existing.info.run_id
    if existing.info.status == "FINISHED":
        raise ConfigError(f"run_name '{name}' already finished (MLflow run {run_id}): choose a new run_name")
    if existing.data.tags.get(FINGERPRINT_TAG) not in (None, _fingerprint(cfg)):
        raise ConfigError(
            f"run_name '{name}' (MLflow run {run_id}) was trained on other data than {cfg.data.root} has now: "
            "choose a new run_name"
        )


def log_checkpoint_bundle(logger: RunLogger, checkpoint: ray.train.Checkpoint) -> str:
    """Log the weights + config bundle of `checkpoint` to the run; returns its runs:/ URI."""
    with tempfile.TemporaryDirectory(prefix="instseg-bundle-") as tmp:
        local = checkpoint.to_directory(str(Path(tmp) / "checkpoint"))
        bundle = bundle_from_checkpoint(local, Path(tmp) / BUNDLE_ARTIFACT)
        for file in bundle.iterdir():
            logger.log_artifact(file, BUNDLE_ARTIFACT)
    return bundle_uri(logger.run_id)


def bundle_uri(run_id: str) -> str:
    """Where a run's logged model bundle is (log_checkpoint_bundle)."""
    return f"runs:/{run_id}/{BUNDLE_ARTIFACT}"


def fit_and_log(trainer: TorchTrainer, cfg: Config, run_id: str, closes_failed_runs: bool = True) -> TrainSummary:
    """Run `trainer`; log the best checkpoint's bundle and close the MLflow run with the outcome.

    Ctrl-C leaves the run KILLED (a rerun with the same run_name resumes it); a failure caused by lost
    nodes becomes TrainingFailed naming them; any other failure propagates with the run FAILED. A Tune trial
    passes closes_failed_runs=False: Tune stops a trial's driver when the scheduler is done with it, which
    this function sees as a failure, possibly after the study has closed the run with Tune's verdict
    (tuning.tune._close_trial_runs), so only the study says how a trial's run ended."""
    logger = RunLogger(cfg.tracking.uri, run_id)

    def close(status: str) -> None:
        if closes_failed_runs:
            logger.finish_after_error(status)

    nodes_before = alive_nodes()
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        # Ray Train's Ctrl-C handler aborts the controller and then exits with status 0: an
        # interrupted run must not look like a success, so it surfaces as an interrupt
        close("KILLED")
        raise KeyboardInterrupt from None
    except ray.train.TrainingFailedError as exc:
        close("FAILED")
        lost = {node_id: address for node_id, address in nodes_before.items() if node_id not in alive_nodes()}
        if lost:
            raise TrainingFailed(describe_node_loss(trainer, lost, exc)) from exc
        raise
    except BaseException:
        close("FAILED")
        raise
    best = result.get_best_checkpoint(FITNESS, FITNESS_MODE) if result.best_checkpoints else result.checkpoint
    try:
        bundle_uri = log_checkpoint_bundle(logger, best) if best is not None else None
        logger.set_tags({BEST_CHECKPOINT_TAG: best.path if best else "none"})
        logger.finish("FINISHED")
    except BaseException:
        # trained, but the model did not reach MLflow: the run must not stay RUNNING nor look finished
        close("FAILED")
        raise
    return TrainSummary(
        run_id=run_id,
        tracking_uri=redact(cfg.tracking.uri),  # summaries are printed and stored by flows: never the credentials
        checkpoint_path=best.path if best else None,
        metrics=dict(result.metrics or {}),
        bundle_uri=bundle_uri,
    )
