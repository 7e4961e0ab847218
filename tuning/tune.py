"""Hyperparameter search on Ray Tune: Optuna (TPE or CMA-ES), random search or BOHB; ASHA, HyperBand or
median-rule early stopping, or population based training (tuning.pbt).

    instseg tune --config configs/demo.yaml [key=value ...]      # python -m tuning.tune is its alias

A study is resumable: rerunning it with the same run_name after Ctrl-C, SIGTERM or a crash restores it
(Tuner.restore) into the same MLflow parent run; finished trials stay as they are, unfinished and errored
ones continue from their last checkpoint (resume_errored: an error that ended a study, such as a lost node,
is usually not the trial's fault, and its epochs are worth keeping).

Train V2 pattern: each trial is a driver function that builds the same TorchTrainer as plain
training (ray_jobs.trainer.build_trainer) with TuneReportCallback forwarding rank-0 metrics.
MLflow: one parent run for the study, one child run per trial (mlflow.parentRunId).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import ray.train
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from instseg.cli import parse_command
from instseg.config import Config, apply_overrides, flatten
from instseg.errors import ConfigError, first_line
from instseg.metrics.names import FITNESS, FITNESS_MODE
from instseg.redaction import redact
from instseg.tracking.liveness import DRIVER_TAGS, NOTE_TAG, Heartbeat, driver_tags
from instseg.tracking.runs import RunLogger, child_runs, create_run
from ray_jobs.cli_common import load_config, run_cli
from ray_jobs.driver_run import (
    BEST_CHECKPOINT_TAG,
    bundle_uri,
    check_resumable,
    claim_run_name,
    create_driver_run,
    fit_and_log,
    log_checkpoint_bundle,
    preflight,
    prepare_data,
)
from ray_jobs.node_loss import TrainingFailed
from ray_jobs.runtime import ORCHESTRATION_CPUS, init_ray
from ray_jobs.shared_paths import check_shared_paths
from ray_jobs.submit import print_result
from ray_jobs.trainer import build_trainer
from tuning.algorithms import build_searcher, build_trial_scheduler
from tuning.pbt import cloned_source, remove_copies
from tuning.search_space import build_param_space
from tuning.summary import TrialSummary, TuneSummary, format_trials, summarise_trials

TRIAL_ID_TAG = "instseg.trial_id"
STOPPED_EARLY_TAG = "instseg.stopped_early"
TRIAL_REASON_TAG = "instseg.trial_reason"  # TrialSummary.reason, on the trial's run


def trial_driver(
    params: dict[str, Any],
    *,
    base_config: dict[str, Any],
    parent_run_id: str,
    study: str,
    driver: dict[str, str],
    prepared: dict[str, Any] | None = None,
) -> None:
    """One Tune trial: the sampled params applied to the base config, trained by build_trainer. Its run carries
    the study driver's tags (`driver`): the study's driver owns the trial's lifetime. `prepared`: what the study's
    preflight found (build_trainer), so that no trial parses, validates or fingerprints the data again."""
    cfg = apply_overrides(Config.model_validate(base_config), params)
    trial_id = tune.get_context().get_trial_id()
    run_id = _open_trial_run(cfg, parent_run_id, trial_id, driver)
    name, start_from = f"{study}-{trial_id}", None
    cloned = tune.get_checkpoint()  # PBT: a copy of the checkpoint of the trial this one continues (tuning.pbt)
    if cloned is not None:
        # a Train run of its own: one of the trial's name would restore the trial's own latest checkpoint instead
        source = cloned_source(cloned)
        name = f"{name}-from-{source}-{Path(cloned.path).name}"
        start_from = {"checkpoint": ray.train.Checkpoint(cloned.path, cloned.filesystem), "source": source}
    trainer = build_trainer(
        cfg,
        run_id=run_id,
        name=name,
        callbacks=[TuneReportCallback()],
        start_from=start_from,
        prepared=prepared,
    )
    fit_and_log(trainer, cfg, run_id, closes_failed_runs=False)  # the study closes trial runs


def _open_trial_run(cfg: Config, parent_run_id: str, trial_id: str, driver: dict[str, str]) -> str:
    """The trial's MLflow run: its earlier one when Tune restarts it (HyperBand resumes paused trials, a restored
    study resumes unfinished ones; Ray Train restores the checkpoint and the loop continues the history), else new."""
    earlier = [
        run for run in child_runs(cfg.tracking.uri, parent_run_id) if run.data.tags.get(TRIAL_ID_TAG) == trial_id
    ]
    if earlier:
        logger = RunLogger(cfg.tracking.uri, earlier[0].info.run_id)
        logger.reopen({**driver, "instseg.trial_status": "running"})
        return logger.run_id
    return create_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        run_name=f"trial-{trial_id}",
        parent_run_id=parent_run_id,
        tags={TRIAL_ID_TAG: trial_id, "instseg.kind": "trial", **driver},
    )


def _close_trial_runs(cfg: Config, trials: list[TrialSummary], run_ids: list[str]) -> None:
    """Every trial run ends with Tune's verdict: ASHA-stopped trials KILLED (their driver saw the stop
    as a failure, or was killed before it could say anything), failed ones FAILED, a run Tune has no
    result for (it died before its first epoch) FAILED, completed ones FINISHED."""
    by_run = {t.run_id: t for t in trials if t.run_id}
    final = {"stopped_early": "KILLED", "error": "FAILED", "completed": "FINISHED"}
    for run_id in run_ids:
        trial = by_run.get(run_id)
        status = trial.status if trial else "error"
        reason = trial.reason if trial else "the trial ended before its first epoch was reported"
        logger = RunLogger(cfg.tracking.uri, run_id)
        logger.set_tags(
            {
                STOPPED_EARLY_TAG: str(status == "stopped_early").lower(),
                "instseg.trial_status": status,
                TRIAL_REASON_TAG: reason,
            }
        )
        if logger.status() != final[status]:
            logger.finish(final[status])


TUNE_SIGINT_VARIABLE = "TUNE_DISABLE_SIGINT_HANDLER"
# keys that may differ when a study resumes: where it runs and how it shows progress, not what it trains
RESUME_MAY_CHANGE = ("ray.address", "train.progress")


def run_tuning(cfg: Config, preflighted: bool = False) -> TuneSummary:
    """cfg with absolute paths -> a finished study: parent + child MLflow runs and the best model bundle.
    A run_name whose study did not finish resumes it (see the module's docstring). `preflighted`: the caller ran
    ray_jobs.driver_run.preflight on this config already (the flow does, before it dispatches any task)."""
    param_space = build_param_space(cfg.tune.search_space)
    # after the flow's preflight the indexes are found again in the time it takes to fingerprint the splits
    prepared = prepare_data(cfg) if preflighted else preflight(cfg)
    init_ray(cfg.ray.address)
    check_shared_paths(cfg)  # on several nodes: every node sees the checkpoints and a sqlite store
    study = cfg.run_name or time.strftime("study-%Y%m%d-%H%M%S")
    parent, restore_from = _open_study_run(cfg, study)
    action = f"resuming from {restore_from}" if restore_from else "new"
    print(f"study {study} ({action}): MLflow parent run {parent.run_id} ({redact(cfg.tracking.uri)})", flush=True)

    driver = tune.with_parameters(
        trial_driver,
        base_config=cfg.model_dump(),
        parent_run_id=parent.run_id,
        study=study,
        driver={key: value for key, value in parent.tags().items() if key in DRIVER_TAGS},
        prepared=prepared,
    )
    trainable = tune.with_resources(driver, {"cpu": ORCHESTRATION_CPUS})
    if restore_from:
        # the searcher's and scheduler's state come back with the trials; resume_errored: see the module docstring
        tuner = tune.Tuner.restore(restore_from, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=FITNESS,
                mode=FITNESS_MODE,
                search_alg=build_searcher(cfg),
                scheduler=build_trial_scheduler(cfg, study),
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=cfg.tune.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=study, storage_path=cfg.ray.storage_path, verbose=1),
        )
    try:
        with Heartbeat(cfg.tracking.uri, parent.run_id), _signals_stop_tune() as stopping:
            grid = tuner.fit()
        if stopping.is_set() or grid.num_terminated + grid.num_errors < len(grid) or len(grid) < cfg.tune.num_samples:
            raise KeyboardInterrupt  # Tune stopped on a signal and returned what it had
        return _finish_study(cfg, grid, parent, study)
    except KeyboardInterrupt:
        _end_study(cfg, parent, "KILLED", "the study was interrupted")
        print(
            f"study {study} interrupted: its runs are marked KILLED; rerun with run_name={study} to resume it",
            file=sys.stderr,
            flush=True,
        )
        raise
    except BaseException as exc:
        _end_study(cfg, parent, "FAILED", f"the study failed: {type(exc).__name__}")
        raise


def _open_study_run(cfg: Config, study: str) -> tuple[RunLogger, str | None]:
    """The study's MLflow parent run and, when an unfinished study of this run_name left Tune state to restore,
    where that state is. A finished study, one on other data or with another config is refused."""
    existing = claim_run_name(cfg, study, kind="study")
    if existing is None:
        parent = RunLogger(cfg.tracking.uri, create_driver_run(cfg, study, kind="study"))
        parent.log_params(flatten(cfg))
        parent.log_dict({k: v.model_dump() for k, v in cfg.tune.search_space.items()}, "search_space.json")
        return parent, None
    check_resumable(cfg, existing, study)
    changed = [
        key
        for key, value in flatten(cfg).items()
        if key in existing.data.params and key not in RESUME_MAY_CHANGE and existing.data.params[key] != str(value)
    ]
    if changed:
        raise ConfigError(
            f"run_name '{study}' is an unfinished study (MLflow run {existing.info.run_id}) with other settings "
            f"({', '.join(changed[:5])}): rerun it with the same config to resume it, or choose a new run_name"
        )
    experiment_path = f"{cfg.ray.storage_path.rstrip('/')}/{study}"
    restorable = tune.Tuner.can_restore(experiment_path)
    if not restorable and child_runs(cfg.tracking.uri, existing.info.run_id):
        raise ConfigError(
            f"study '{study}' (MLflow run {existing.info.run_id}) has trials but no Tune state under "
            f"{experiment_path} to resume them from: choose a new run_name"
        )
    parent = RunLogger(cfg.tracking.uri, existing.info.run_id)
    parent.reopen({**driver_tags(), NOTE_TAG: "resumed"})
    if not restorable:  # it stopped before its first trial: start the search, keep the run
        parent.log_params(flatten(cfg))
    return parent, experiment_path if restorable else None


@contextlib.contextmanager
def _signals_stop_tune() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM (`ray job stop`, a scheduler, `kill`) stop the study gracefully: Tune ends the trials
    and writes the experiment state a rerun resumes from (its SIGUSR1 handler), and the event that this yields
    is set, since tuner.fit() returns normally then. A second signal stops at once."""
    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def stop(signum: int, frame: Any) -> None:
        if stopping.is_set() or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            raise KeyboardInterrupt  # a second signal, or Tune is not running yet
        stopping.set()
        print("stopping the study: ending its trials and saving its state (again to stop at once)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = {signal.SIGUSR1: signal.getsignal(signal.SIGUSR1)}  # Tune's handler would outlive its fit()
    previous.update({sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)})
    previous_env = os.environ.get(TUNE_SIGINT_VARIABLE)
    os.environ[TUNE_SIGINT_VARIABLE] = "1"  # Tune would replace our SIGINT handler with its own
    try:
        yield stopping
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if previous_env is None:
            os.environ.pop(TUNE_SIGINT_VARIABLE, None)
        else:
            os.environ[TUNE_SIGINT_VARIABLE] = previous_env


def _end_study(cfg: Config, parent: RunLogger, status: str, note: str) -> None:
    """A study that did not finish: no run of it stays RUNNING (trial runs, then the parent). MLflow failing
    here too is said in one line, so that the error that ended the study is the one that surfaces."""
    try:
        for run in child_runs(cfg.tracking.uri, parent.run_id):
            if run.info.status == "RUNNING":
                child = RunLogger(cfg.tracking.uri, run.info.run_id)
                verdict = "interrupted" if status == "KILLED" else "error"
                child.set_tags({NOTE_TAG: note, "instseg.trial_status": verdict})
                child.finish(status)
        if parent.status() == "RUNNING":
            parent.set_tags({NOTE_TAG: note})
            parent.finish(status)
    except Exception as exc:  # noqa: BLE001 (the next start closes what is left: tracking.liveness)
        print(f"could not close the study's MLflow runs: {first_line(exc)}", file=sys.stderr, flush=True)


def _finish_study(cfg: Config, grid: Any, parent: RunLogger, study: str) -> TuneSummary:
    """After a complete tuner.fit(): trial verdicts, the best trial's bundle, the study's metrics and table."""
    parent_run_id = parent.run_id
    children = child_runs(cfg.tracking.uri, parent_run_id)
    trials = summarise_trials(grid, cfg, {run.data.tags.get(TRIAL_ID_TAG): run for run in children})
    _close_trial_runs(cfg, trials, [run.info.run_id for run in children])
    scored = [t for t in trials if t.best_fitness is not None and t.run_id is not None]
    if not scored:
        parent.finish("FAILED")
        errors = [str(r.error).splitlines()[0] for r in grid if r.error is not None]
        raise TrainingFailed(f"no trial reported {FITNESS}; first error: {errors[0] if errors else 'none'}")

    best_result = grid.get_best_result(metric=FITNESS, mode=FITNESS_MODE, scope="all")
    best_trial_id = str(best_result.metrics.get("trial_id"))
    best = next(t for t in scored if t.trial_id == best_trial_id)
    history = best_result.metrics_dataframe
    checkpoint_path = history.loc[history[FITNESS].idxmax(), CHECKPOINT_PATH_KEY]
    # a trial run that finished logged its best checkpoint's bundle already; a stopped best trial (or one whose
    # best epoch came before a PBT restart) gets it here
    best_logger = RunLogger(cfg.tracking.uri, best.run_id)
    if best_logger.tags().get(BEST_CHECKPOINT_TAG) == checkpoint_path:
        best_bundle_uri = bundle_uri(best.run_id)
    else:
        best_bundle_uri = log_checkpoint_bundle(best_logger, ray.train.Checkpoint(checkpoint_path))

    summary = TuneSummary(
        parent_run_id=parent_run_id,
        tracking_uri=redact(cfg.tracking.uri),
        best_trial_id=best.trial_id,
        best_run_id=best.run_id,
        best_params=best.params,
        best_fitness=float(best.best_fitness),
        best_bundle_uri=best_bundle_uri,
        trials=trials,
    )
    parent.log_metrics(
        {
            f"best/{FITNESS}": summary.best_fitness,
            "trials/total": len(trials),
            "trials/stopped_early": sum(t.status == "stopped_early" for t in trials),
            "trials/error": sum(t.status == "error" for t in trials),
        },
        step=0,
    )
    parent.log_params({f"best.{k}": v for k, v in best.params.items()})
    parent.set_tags({"instseg.best_run_id": best.run_id, "instseg.best_trial_id": best.trial_id})
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.json"
        table.write_text(json.dumps([asdict(t) for t in trials], indent=2, default=str))
        parent.log_artifact(table)
    parent.finish("FINISHED")
    if cfg.tune.scheduler == "pbt":
        remove_copies(cfg.ray.storage_path, study)
    return summary


def tune_command(args: argparse.Namespace) -> int:
    summary = run_tuning(load_config(args))
    print(format_trials(summary))
    print(
        f"best trial {summary.best_trial_id}: {FITNESS} {summary.best_fitness:.5f}, "
        f"model bundle {summary.best_bundle_uri}"
    )
    print_result(summary.to_dict())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tuning.tune ARGS` = `instseg tune ARGS`."""
    return tune_command(parse_command(["tune"], argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
