"""What a flow run leaves to read in the Prefect UI: markdown artifacts for the study's trials and for the
promotion decision (instseg.tracking.registry records the same decision on the model version)."""

from __future__ import annotations

from typing import Any

from instseg.metrics.names import FITNESS
from tuning.summary import TuneSummary, format_params

TRIALS_ARTIFACT = "instseg-trials"
PROMOTION_ARTIFACT = "instseg-promotion"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


def run_link(uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """A trial's MLflow run: a link when the tracking server is reachable over HTTP, else its id."""
    if run_id is None:
        return "-"
    if uri.startswith(("http://", "https://")) and experiment_id is not None:
        return f"[{run_id[:8]}]({uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"`{run_id}`"


def trials_markdown(summary: TuneSummary, experiment_id: str | None = None) -> str:
    """The study's trials, best first: params, epochs, best fitness, status and why it ended, MLflow run."""
    lines = [
        f"# Study {summary.parent_run_id}",
        "",
        f"Best: trial `{summary.best_trial_id}`, {FITNESS} {summary.best_fitness:.5f}, "
        f"bundle `{summary.best_bundle_uri}`",
        "",
        f"| trial | status | epochs | best {FITNESS} | params | why it ended | MLflow run |",
        "| --- | --- | ---: | ---: | --- | --- | --- |",
    ]
    for trial in sorted(summary.trials, key=lambda t: -(t.best_fitness if t.best_fitness is not None else -1)):
        params = format_params(trial.params)
        link = run_link(summary.tracking_uri, experiment_id, trial.run_id)
        lines.append(
            f"| `{trial.trial_id}` | {trial.status} | {trial.epochs} | {_number(trial.best_fitness)} | {params} | "
            f"{trial.reason or '-'} | {link} |"
        )
    return "\n".join(lines) + "\n"


def promotion_markdown(result: dict[str, Any]) -> str:
    """Challenger against champion on one split of one dataset version, what was decided, by whom."""
    decision = "promoted" if result["promoted"] else "kept champion"
    champion = f"v{result['champion_version']}" if result["champion_version"] else "none"
    keys = sorted(set(result.get("challenger_metrics") or {}) | set(result.get("champion_metrics") or {}))
    lines = [
        f"# {result['model_name']}: {decision}",
        "",
        f"Judged on split `{result.get('split')}` of the dataset with fingerprint `{result.get('data_fingerprint')}`"
        f" (minimum gain {result.get('min_improvement', 0.0)}); `champion` is now v{result['champion_after']}. "
        f"Decided {result.get('decided_at', '')} by {result.get('decided_by', '-')}; "
        f"recorded in MLflow run `{result.get('record_run_id')}`.",
        "",
        f"| | challenger v{result['challenger_version']} | champion {champion} |",
        "| --- | ---: | ---: |",
        f"| {FITNESS} | {_number(result['challenger_fitness'])} | {_number(result['champion_fitness'])} |",
    ]
    for key in keys:
        challenger = (result.get("challenger_metrics") or {}).get(key)
        held = (result.get("champion_metrics") or {}).get(key)
        lines.append(f"| {key} | {_number(challenger)} | {_number(held)} |")
    return "\n".join(lines) + "\n"
