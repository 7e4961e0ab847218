"""Fitness: the single number that ranks checkpoints, trials and models (metrics.names.FITNESS)."""

from __future__ import annotations

from typing import Mapping


def fitness(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum(weight * metric); COCO's -1 ("no ground truth in this range") counts as 0."""
    missing = [key for key in weights if key not in metrics]
    if missing:
        raise KeyError(f"fitness needs metrics {missing}; have {sorted(metrics)}")
    return float(sum(w * max(float(metrics[key]), 0.0) for key, w in weights.items()))
