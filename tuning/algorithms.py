"""How a study explores and prunes: the searcher (tune.search) that picks each trial's values and the scheduler
(tune.scheduler) that stops, pauses or (PBT) restarts trials, judged on FITNESS per epoch."""

from __future__ import annotations

import math
import sys
from typing import Any

import optuna
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandForBOHB,
    HyperBandScheduler,
    MedianStoppingRule,
)
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.bohb import TuneBOHB
from ray.tune.search.optuna import OptunaSearch

from instseg.config import Config
from instseg.metrics.names import EPOCH
from tuning.pbt import build_pbt


def build_trial_scheduler(cfg: Config, study: str) -> Any:
    """tune.scheduler: which trials stop before train.epochs (or, PBT, continue from better ones), judged on FITNESS
    per epoch."""
    grace = min(cfg.tune.grace_period, cfg.train.epochs)
    if cfg.tune.scheduler == "pbt":
        return build_pbt(cfg, study)
    if cfg.tune.scheduler == "hyperband":
        # synchronous brackets: a trial that reached its rung waits (paused) for the rest of its bracket, then
        # continues from its checkpoint or stops; BOHB's searcher needs its own variant of the scheduler
        bracketing = HyperBandForBOHB if cfg.tune.search == "bohb" else HyperBandScheduler
        smallest = smallest_halving_bracket(cfg.train.epochs, cfg.tune.reduction_factor)
        if smallest is not None and cfg.tune.max_concurrent_trials < smallest:
            print(
                f"note: HyperBand halves brackets of {smallest}+ trials here, more than tune.max_concurrent_trials="
                f"{cfg.tune.max_concurrent_trials} can hold at once (a paused trial still counts), so it will stop "
                "no trial early: raise max_concurrent_trials or use tune.scheduler=asha",
                file=sys.stderr,
                flush=True,
            )
        return bracketing(time_attr=EPOCH, max_t=cfg.train.epochs, reduction_factor=cfg.tune.reduction_factor)
    if cfg.tune.scheduler == "median":
        return MedianStoppingRule(
            time_attr=EPOCH, grace_period=grace, min_samples_required=cfg.tune.min_samples_required
        )
    if cfg.tune.scheduler == "asha":
        return ASHAScheduler(
            time_attr=EPOCH, max_t=cfg.train.epochs, grace_period=grace, reduction_factor=cfg.tune.reduction_factor
        )
    return FIFOScheduler()


def smallest_halving_bracket(max_t: int, eta: int) -> int | None:
    """Trials in the smallest HyperBand bracket that stops any (Ray's bracket sizes: s = 1, 2, ... while its first
    rung max_t / eta^s is at least one epoch); None when there is none (max_t below eta)."""
    s_max_1 = int(round(math.log(max_t) / math.log(eta))) + 1
    sizes = [math.ceil(s_max_1 / (s + 1) * eta**s) for s in range(1, s_max_1) if int(max_t * eta**-s) >= 1]
    return min(sizes) if sizes else None


def build_searcher(cfg: Config) -> Any:
    """tune.search: how each trial's values are chosen, seeded by tune.seed."""
    if cfg.tune.search == "random":
        # Tune applies max_concurrent_trials to Searchers only: this generator takes it itself, or every trial
        # would start at once, and their worker groups would time out waiting for CPUs or GPUs
        return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent_trials)
    if cfg.tune.search == "bohb":
        return TuneBOHB(seed=cfg.tune.seed)
    if cfg.tune.search == "optuna-cmaes":
        # CMA-ES samples continuous keys jointly; `choice` keys fall back to Optuna's independent sampler
        sampler = optuna.samplers.CmaEsSampler(seed=cfg.tune.seed, warn_independent_sampling=False)
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed)
    return OptunaSearch(sampler=sampler)
