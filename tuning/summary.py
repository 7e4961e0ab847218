"""What a study hands on: one TrialSummary per trial and the study's TuneSummary (built from Tune's results and
the trials' MLflow runs), and their printed form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from instseg.config import Config
from instseg.errors import first_line
from instseg.metrics.names import EARLY_STOPPED, EPOCH, FITNESS
from ray_jobs.train_loop import CLONED_TAG


@dataclass
class TrialSummary:
    trial_id: str
    run_id: str | None
    params: dict[str, Any]
    epochs: int
    fitness: float | None
    best_fitness: float | None
    status: str  # completed | stopped_early | error
    reason: str = ""  # why it ended where it did: the scheduler that stopped it, early stopping, or the error


@dataclass
class TuneSummary:
    """What a study hands to registration: the parent run, the best trial and its model bundle."""

    parent_run_id: str
    tracking_uri: str
    best_trial_id: str
    best_run_id: str
    best_params: dict[str, Any]
    best_fitness: float
    best_bundle_uri: str
    trials: list[TrialSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuneSummary":
        return cls(**{**data, "trials": [TrialSummary(**t) for t in data["trials"]]})


def format_params(params: dict[str, Any], digits: int = 3) -> str:
    """Sampled values as `key=value, ...`, floats to `digits` significant digits."""
    return ", ".join(f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def format_trials(summary: TuneSummary) -> str:
    lines = [f"{'trial':<14}{'status':<15}{'epochs':>7}{FITNESS:>12}  params; why it ended"]
    for t in sorted(summary.trials, key=lambda t: -(t.best_fitness or -1)):
        params = format_params(t.params)
        best = f"{t.best_fitness:.5f}" if t.best_fitness is not None else "-"
        lines.append(f"{t.trial_id:<14}{t.status:<15}{t.epochs:>7}{best:>12}  {params}; {t.reason}")
    return "\n".join(lines)


def summarise_trials(grid: Any, cfg: Config, runs_by_trial: dict[str, Any]) -> list[TrialSummary]:
    trials = []
    for result in grid:
        history = result.metrics_dataframe
        trial_id = str(result.metrics.get("trial_id") or Path(result.path).name)
        epochs = int(result.metrics.get(EPOCH, 0) or 0)
        if result.error is not None:
            status, reason = "error", first_line(result.error, 300)
        elif epochs < cfg.train.epochs and not result.metrics.get(EARLY_STOPPED):
            # by the scheduler; patience-based early stopping counts as completed
            status, reason = "stopped_early", f"stopped by the {cfg.tune.scheduler} scheduler after epoch {epochs}"
        elif epochs < cfg.train.epochs:
            status, reason = "completed", f"train.patience: no fitness gain, ended after epoch {epochs}"
        else:
            status, reason = "completed", f"all {epochs} epochs"
        has_fitness = history is not None and FITNESS in history
        run = runs_by_trial.get(trial_id)
        if run is not None and run.data.tags.get(CLONED_TAG):  # PBT: where its weights came from
            reason += "; continued " + ", ".join(
                f"trial {source} from epoch {epoch}"
                for source, epoch in (step.rsplit("@", 1) for step in run.data.tags[CLONED_TAG].split(","))
            )
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                run_id=run.info.run_id if run else None,
                params={k: v for k, v in (result.config or {}).items()},
                epochs=epochs,
                fitness=float(result.metrics[FITNESS]) if FITNESS in result.metrics else None,
                best_fitness=float(history[FITNESS].max()) if has_fitness else None,
                status=status,
                reason=reason,
            )
        )
    return trials
