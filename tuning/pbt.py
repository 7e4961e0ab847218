"""Population based training (tune.scheduler=pbt) on Ray Train checkpoints.

Ray's PopulationBasedTraining clones a trial from the checkpoints Tune keeps for it. Our trials drive Ray Train
runs, so the checkpoints are Train's: each result names its latest (checkpoint_path), and Train keeps only the best
ray.checkpoints_to_keep of a run. At each perturbation the top trials' latest checkpoints are therefore copied
aside (<ray.storage_path>/<study>/pbt/<trial id>/epoch_NNNN), and each bottom trial restarts with an explored
config and such a copy as its Tune checkpoint; its driver then starts a new Train run from it
(tuning.tune.trial_driver), and the loop applies the explored optimizer values over the restored state.

Synchronous PBT: the population reaches each perturbation epoch together (trials that arrive first wait, paused),
so a clone continues from the very epoch it left and its MLflow run has every epoch once.
"""

from __future__ import annotations

import logging
import random
from pathlib import PurePosixPath
from typing import Any

from pyarrow import fs
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from instseg.config import Config, SearchDimension
from instseg.metrics.names import EPOCH
from tuning.search_space import to_domain

logger = logging.getLogger(__name__)
COPIES_FOLDER = "pbt"


class TrainCheckpointPBT(PopulationBasedTraining):
    """Synchronous PBT whose exploit step copies and restarts from Ray Train checkpoints (see the module)."""

    def __init__(self, *, storage_path: str, study: str, epochs: int, **options: Any) -> None:
        super().__init__(synch=True, **options)
        self.storage_path = storage_path
        self.study = study
        self.epochs = epochs

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get(EPOCH, 0) >= self.epochs:
            return TrialScheduler.CONTINUE  # its last epoch: the trial ends by itself, nothing is left to exploit
        return super().on_trial_result(tune_controller, trial, result)

    def _checkpoint_or_exploit(
        self, trial: Any, tune_controller: Any, upper_quantile: list, lower_quantile: list
    ) -> None:
        state = self._trial_state[trial]
        state.last_checkpoint = self._keep_checkpoint(trial, state.last_result) if trial in upper_quantile else None
        if trial not in lower_quantile:
            return
        source = random.choice(upper_quantile)  # the top trials were handled first (synchronous PBT's order)
        if self._trial_state[source].last_checkpoint is None:
            logger.warning(
                "PBT: trial %s has no checkpoint to clone; trial %s goes on as it is", source.trial_id, trial.trial_id
            )
            return
        self._exploit(tune_controller, trial, source)

    def _keep_checkpoint(self, trial: Any, result: dict[str, Any] | None) -> tune.Checkpoint | None:
        """A copy of the checkpoint `result` names, beyond the reach of Train's num_to_keep; None if there is none."""
        source = (result or {}).get(CHECKPOINT_PATH_KEY)
        if not source:
            return None
        storage, base = storage_filesystem(self.storage_path)
        copy = f"{base}/{self.study}/{COPIES_FOLDER}/{trial.trial_id}/{PurePosixPath(source).name}"
        try:
            if storage.get_file_info(copy).type == fs.FileType.NotFound:
                storage.create_dir(copy, recursive=True)
                fs.copy_files(source, copy, source_filesystem=storage, destination_filesystem=storage)
        except OSError as exc:
            logger.warning("PBT: could not copy trial %s's checkpoint %s: %s", trial.trial_id, source, exc)
            return None
        return tune.Checkpoint(copy, storage)


def cloned_source(checkpoint: Any) -> str:
    """The trial whose checkpoint `checkpoint` (a copy made by TrainCheckpointPBT) is."""
    return PurePosixPath(checkpoint.path).parent.name


def storage_filesystem(storage_path: str) -> tuple[fs.FileSystem, str]:
    """ray.storage_path as (filesystem, path in it): a local folder or an object-store URI, as Ray Train reads it."""
    if "://" in storage_path:
        return fs.FileSystem.from_uri(storage_path)
    return fs.LocalFileSystem(), storage_path.rstrip("/")


def remove_copies(storage_path: str, study: str) -> None:
    """The checkpoint copies of a finished study (every trial has its own checkpoints by then)."""
    storage, base = storage_filesystem(storage_path)
    folder = f"{base}/{study}/{COPIES_FOLDER}"
    try:
        if storage.get_file_info(folder).type == fs.FileType.Directory:
            storage.delete_dir(folder)
    except OSError as exc:
        logger.warning("could not remove PBT's checkpoint copies under %s: %s", folder, exc)


class WithinSearchSpace:
    """PBT's explore step scales values by 0.8 or 1.2: keep them inside the declared search space."""

    def __init__(self, space: dict[str, SearchDimension]) -> None:
        self.space = space

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, dim in self.space.items():
            if dim.type == "choice" or key not in config:
                continue
            high = dim.high - 1 if dim.type == "randint" else dim.high
            config[key] = type(config[key])(min(max(config[key], dim.low), high))
        return config


def build_pbt(cfg: Config, study: str) -> TrainCheckpointPBT:
    """tune.scheduler=pbt: the population explores its search space every tune.perturbation_interval epochs."""
    space = cfg.tune.search_space
    return TrainCheckpointPBT(
        storage_path=cfg.ray.storage_path,
        study=study,
        epochs=cfg.train.epochs,
        time_attr=EPOCH,
        perturbation_interval=cfg.tune.perturbation_interval,
        quantile_fraction=cfg.tune.quantile_fraction,
        resample_probability=cfg.tune.resample_probability,
        hyperparam_mutations={
            key: list(dim.values) if dim.type == "choice" else to_domain(dim) for key, dim in space.items()
        },
        custom_explore_fn=WithinSearchSpace(space),
    )
