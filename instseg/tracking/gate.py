"""The promotion gate: challenger against champion on one held-out split, a commit that two racing promotions
cannot both win, and a record of every decision.

Both models are scored now, on the same split, identified by its fingerprint (checked again after scoring, so
data that changed meanwhile refuses the decision instead of mixing two datasets). The challenger replaces the
champion only when its FITNESS is better by at least `min_improvement`. The commit point is the `champion`
alias, moved under registry_lock only if the champion is still the one the challenger was judged against;
otherwise the challenger is judged again against the new one. Every decision is written as tags on both
versions and as a run in the PROMOTIONS_EXPERIMENT experiment.
"""

from __future__ import annotations

import getpass
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from instseg.errors import InstsegError
from instseg.metrics.names import FITNESS, FITNESS_MODE
from instseg.redaction import redact
from instseg.tracking.registry import CHALLENGER, CHAMPION, download_bundle, registry_lock, version_for
from instseg.tracking.runs import RunLogger, create_run

PROMOTIONS_EXPERIMENT = "instseg-promotions"
# what promotion records of each model besides FITNESS: mask and box mAP50-95 / mAP50 on the held-out split
PROMOTION_METRICS = ("val/segm_map", "val/segm_map50", "val/bbox_map", "val/bbox_map50")
COMMIT_ATTEMPTS = 3  # judge again this often when other promotions keep moving the champion meanwhile


@dataclass
class PromotionResult:
    model_name: str
    challenger_version: str
    challenger_fitness: float
    champion_version: str | None
    champion_fitness: float | None
    promoted: bool
    champion_after: str
    challenger_metrics: dict[str, float] = field(default_factory=dict)  # PROMOTION_METRICS
    champion_metrics: dict[str, float] | None = None
    split: str | None = None
    data_fingerprint: str | None = None
    min_improvement: float = 0.0
    decided_by: str = ""
    decided_at: str = ""
    record_run_id: str | None = None  # its run in PROMOTIONS_EXPERIMENT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def who_decides(context: str = "") -> str:
    """user@host (pid N), with what decided (a command, a flow run) before it."""
    who = f"{getpass.getuser()}@{socket.gethostname()} (pid {os.getpid()})"
    return f"{context} by {who}" if context else who


def better_by(challenger: float, champion: float, min_improvement: float) -> bool:
    """The challenger is better (in FITNESS_MODE's direction) by more than 0 and at least min_improvement."""
    gain = challenger - champion if FITNESS_MODE == "max" else champion - challenger
    return gain > 0 and gain >= min_improvement


def promote(
    uri: str,
    model_name: str,
    score: Callable[[Path], dict[str, float]],
    *,
    version: str | None = None,
    min_improvement: float = 0.0,
    split: str | None = None,
    fingerprint: Callable[[], str] | None = None,
    decided_by: str | None = None,
) -> PromotionResult:
    """Score `version` (made the `challenger` first; default: the one the alias points at) and the champion with
    `score(bundle_dir)` (their bundles are downloaded into folders named `<role>-v<version>`), move `champion` if
    the challenger wins, and record the decision. `fingerprint()` names the data `score` reads (checked before and
    after)."""
    client = MlflowClient(uri)
    challenger = _challenger(client, model_name, version)
    data = fingerprint() if fingerprint else None
    scores: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="instseg-promote-") as tmp:

        def score_of(role: str, model_version: Any) -> dict[str, float]:
            key = str(model_version.version)
            if key not in scores:
                bundle = download_bundle(uri, f"models:/{model_name}/{key}", Path(tmp) / f"{role}-v{key}")
                scores[key] = score(bundle)
            return scores[key]

        for _ in range(COMMIT_ATTEMPTS):
            champion = version_for(client, model_name, CHAMPION)
            challenger_metrics = score_of(CHALLENGER, challenger)
            champion_metrics = score_of(CHAMPION, champion) if champion is not None else None
            if fingerprint and fingerprint() != data:
                raise InstsegError(
                    f"the data of split {split} changed while {model_name} was being scored: "
                    "nothing promoted; run the promotion again"
                )
            promoted = champion is None or (
                str(champion.version) != str(challenger.version)
                and better_by(challenger_metrics[FITNESS], champion_metrics[FITNESS], min_improvement)
            )
            if _commit(client, model_name, champion, challenger, promoted):
                break
        else:
            raise InstsegError(
                f"{model_name}: the champion kept changing while this promotion scored models "
                f"({COMMIT_ATTEMPTS} tries): run it again"
            )
    result = PromotionResult(
        model_name=model_name,
        challenger_version=str(challenger.version),
        challenger_fitness=challenger_metrics[FITNESS],
        champion_version=None if champion is None else str(champion.version),
        champion_fitness=champion_metrics[FITNESS] if champion_metrics else None,
        promoted=promoted,
        champion_after=str(challenger.version if promoted else champion.version),
        challenger_metrics=_subset(challenger_metrics),
        champion_metrics=_subset(champion_metrics) if champion_metrics else None,
        split=split,
        data_fingerprint=data,
        min_improvement=min_improvement,
        decided_by=decided_by or who_decides(),
        decided_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    result.record_run_id = _record(uri, result)
    _tag_versions(client, result)
    return result


def _challenger(client: MlflowClient, model_name: str, version: str | None) -> Any:
    if version is None:
        challenger = version_for(client, model_name, CHALLENGER)
        if challenger is None:
            raise InstsegError(f"registered model '{model_name}' has no '{CHALLENGER}' alias: register a model first")
        return challenger
    try:
        chosen = client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise InstsegError(
            f"registered model '{model_name}' has no version {version} in {redact(client.tracking_uri)} "
            f"(`instseg models {model_name}` lists them): {redact(exc.message.splitlines()[0])}"
        ) from None
    client.set_registered_model_alias(model_name, CHALLENGER, str(version))
    return chosen


def _commit(client: MlflowClient, model_name: str, judged_against: Any, challenger: Any, promoted: bool) -> bool:
    """Under the registry lock: False if the champion is no longer the one judged against (judge again), else
    move it when promoted and check that it points at the challenger now."""
    expected = None if judged_against is None else str(judged_against.version)
    with registry_lock(client, model_name):
        current = version_for(client, model_name, CHAMPION)
        if (None if current is None else str(current.version)) != expected:
            return False
        if promoted:
            client.set_registered_model_alias(model_name, CHAMPION, str(challenger.version))
            after = version_for(client, model_name, CHAMPION)
            if after is None or str(after.version) != str(challenger.version):
                raise InstsegError(f"{model_name}: the champion alias did not take version {challenger.version}")
    return True


def _subset(metrics: dict[str, float] | None) -> dict[str, float]:
    return {key: float(metrics[key]) for key in PROMOTION_METRICS if key in (metrics or {})}


def _decision(result: PromotionResult) -> str:
    return "promoted" if result.promoted else "kept champion"


def _record(uri: str, result: PromotionResult) -> str:
    """The decision as a finished run of PROMOTIONS_EXPERIMENT: who and what, on which data, both scores."""
    run_id = create_run(
        uri,
        PROMOTIONS_EXPERIMENT,
        run_name=f"{result.model_name}-v{result.challenger_version}",
        tags={
            "instseg.kind": "promotion",
            "promotion.decision": _decision(result),
            "promotion.decided_by": result.decided_by,
            "promotion.model_name": result.model_name,
        },
    )
    logger = RunLogger(uri, run_id)
    logger.log_params(
        {
            "model_name": result.model_name,
            "challenger_version": result.challenger_version,
            "champion_version": result.champion_version or "none",
            "champion_after": result.champion_after,
            "split": result.split or "-",
            "data_fingerprint": result.data_fingerprint or "-",
            "min_improvement": result.min_improvement,
            "decided_at": result.decided_at,
        }
    )
    metrics = {f"challenger/{FITNESS}": result.challenger_fitness}
    metrics.update({f"challenger/{k.removeprefix('val/')}": v for k, v in result.challenger_metrics.items()})
    if result.champion_fitness is not None:
        metrics[f"champion/{FITNESS}"] = result.champion_fitness
        metrics.update({f"champion/{k.removeprefix('val/')}": v for k, v in (result.champion_metrics or {}).items()})
    logger.log_metrics(metrics, step=0)
    logger.finish("FINISHED")
    return run_id


def _tag_versions(client: MlflowClient, result: PromotionResult) -> None:
    """The challenger's version carries its promotion (`promotion.*`, which `instseg models` and rollback read);
    the champion's version records that it was challenged (`challenged.*`), keeping its own promotion's tags."""
    shared = {
        "split": result.split or "-",
        "data_fingerprint": result.data_fingerprint or "-",
        "decided_by": result.decided_by,
        "decided_at": result.decided_at,
        "record_run_id": result.record_run_id,
        "min_improvement": result.min_improvement,
    }
    tags = {
        f"challenger_{FITNESS}": result.challenger_fitness,
        f"champion_{FITNESS}": "none" if result.champion_fitness is None else result.champion_fitness,
        "champion_version": result.champion_version or "none",
        "decision": _decision(result),
        **{f"challenger_{key.removeprefix('val/')}": v for key, v in result.challenger_metrics.items()},
        **{f"champion_{key.removeprefix('val/')}": v for key, v in (result.champion_metrics or {}).items()},
        **shared,
    }
    for key, value in tags.items():
        client.set_model_version_tag(result.model_name, result.challenger_version, f"promotion.{key}", str(value))
    if result.champion_version and result.champion_version != result.challenger_version:
        challenged = {
            "by_version": result.challenger_version,
            "decision": _decision(result),
            f"by_{FITNESS}": result.challenger_fitness,
            f"own_{FITNESS}": result.champion_fitness,
            **shared,
        }
        for key, value in challenged.items():
            client.set_model_version_tag(result.model_name, result.champion_version, f"challenged.{key}", str(value))
