"""Register and promote, the same way from the flow and from the command line (`instseg train --register`,
`instseg register`, `instseg promote`).

Registering makes a training run's bundle a new version of a registered model and points `challenger` at
it. Promotion is the gate: challenger and champion are scored on the config's validation split, and
`champion` moves only when the challenger's FITNESS is better (instseg.tracking.gate records both scores and
the decision on both versions and in the instseg-promotions experiment).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from instseg.config import Config
from instseg.tracking.gate import PromotionResult, promote, who_decides
from instseg.tracking.pyfunc_model import BUNDLE_ARTIFACT
from instseg.tracking.registry import download_bundle, register_bundle


@dataclass
class Registration:
    """What registration hands to promotion: the model, its new version (now its challenger) and the tracking
    store it is in (redacted: summaries are printed and stored by flows)."""

    model_name: str
    version: str
    tracking_uri: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Registration":
        return cls(**data)


def register_run(
    uri: str,
    run_id: str,
    model_name: str,
    tags: Mapping[str, str] | None = None,
    bundle_uri: str | None = None,
) -> str:
    """Register the bundle training run `run_id` logged (default runs:/RUN_ID/bundle) as the next version of
    `model_name`, now its challenger; returns the version."""
    with tempfile.TemporaryDirectory(prefix="instseg-register-") as tmp:
        bundle = download_bundle(uri, bundle_uri or f"runs:/{run_id}/{BUNDLE_ARTIFACT}", Path(tmp))
        return register_bundle(uri, run_id, bundle, model_name, tags=dict(tags or {}))


def promote_on_split(cfg: Config, model_name: str, version: str | None = None, decided_by: str = "") -> PromotionResult:
    """The promotion gate (instseg.tracking.gate) on cfg.data.val_split (cfg with resolved paths): `version`, if
    given, becomes the challenger first; the challenger then replaces the champion if its fitness is better by at
    least cfg.registry.min_improvement. `decided_by`: what asked (a command, a flow run), recorded with it."""
    from instseg.data.coco import dataset_fingerprint
    from instseg.evaluation import evaluate_on_split
    from instseg.models.bundle import load_bundle

    def score(bundle_dir: Path) -> dict[str, float]:
        model, label_map, _ = load_bundle(bundle_dir)
        return evaluate_on_split(
            model, label_map, cfg.data, cfg.data.val_split, cfg.metrics.fitness_weights, backend=cfg.metrics.backend
        )

    return promote(
        cfg.tracking.uri,
        model_name,
        score,
        version=version,
        min_improvement=cfg.registry.min_improvement,
        split=cfg.data.val_split,
        fingerprint=lambda: dataset_fingerprint(cfg.data.root, (cfg.data.val_split,)),
        decided_by=who_decides(decided_by),
    )


def describe(result: PromotionResult) -> str:
    """One line: the two fitness values and the decision."""
    champion = (
        f"champion v{result.champion_version} fitness {result.champion_fitness:.5f}"
        if result.champion_version
        else "no champion yet"
    )
    decision = "promoted" if result.promoted else "kept champion"
    return (
        f"{result.model_name}: challenger v{result.challenger_version} fitness {result.challenger_fitness:.5f} vs "
        f"{champion}: {decision}; champion is now v{result.champion_after}"
    )
