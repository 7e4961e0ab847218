"""Search space: the YAML's `tune.search_space` (dotted config key -> distribution) as Ray Tune domains. The
space was checked when the config loaded (instseg.config.check_search_space)."""

from __future__ import annotations

from typing import Any

from ray import tune

from instseg.config import SearchDimension
from instseg.errors import ConfigError


def to_domain(dim: SearchDimension) -> Any:
    """One dimension as a Tune domain."""
    if dim.type == "choice":
        return tune.choice(dim.values)
    if dim.type == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.type == "uniform":
        return tune.uniform(dim.low, dim.high)
    return tune.randint(int(dim.low), int(dim.high))


def build_param_space(space: dict[str, SearchDimension]) -> dict[str, Any]:
    """Tune's param_space; a study needs at least one key."""
    if not space:
        raise ConfigError(
            "tune.search_space is empty: add at least one key, "
            "e.g. train.lr: {type: loguniform, low: 0.001, high: 0.05}"
        )
    return {key: to_domain(dim) for key, dim in space.items()}
