"""Search space: the YAML's `tune.search_space` (dotted config key -> distribution) as Ray Tune domains."""

from __future__ import annotations

from typing import Any

from ray import tune

from instseg.config import SearchDimension
from instseg.errors import ConfigError


def to_domain(key: str, dim: SearchDimension) -> Any:
    if dim.type == "choice":
        if not dim.values:
            raise ConfigError(f"tune.search_space.{key}: type choice needs a non-empty 'values' list")
        return tune.choice(dim.values)
    if dim.low is None or dim.high is None or dim.low >= dim.high:
        raise ConfigError(
            f"tune.search_space.{key}: type {dim.type} needs low < high (got low={dim.low}, high={dim.high})"
        )
    if dim.type == "loguniform":
        if dim.low <= 0:
            raise ConfigError(f"tune.search_space.{key}: loguniform needs low > 0 (got {dim.low})")
        return tune.loguniform(dim.low, dim.high)
    if dim.type == "uniform":
        return tune.uniform(dim.low, dim.high)
    return tune.randint(int(dim.low), int(dim.high))


def build_param_space(space: dict[str, SearchDimension]) -> dict[str, Any]:
    if not space:
        raise ConfigError(
            "tune.search_space is empty: add at least one key, "
            "e.g. train.lr: {type: loguniform, low: 0.001, high: 0.05}"
        )
    return {key: to_domain(key, dim) for key, dim in space.items()}
