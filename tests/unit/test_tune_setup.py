"""The study's searcher and scheduler come from the config (tune.search, tune.scheduler); the trial table says
why each trial ended. (Each runs a real study in the integration tests: asha + optuna-tpe and hyperband + bohb in
test_tune, hyperband + random in test_tune_resume, median + random in test_flow, none + optuna-cmaes in
test_resilience.)"""

import optuna
import pytest
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB, HyperBandScheduler, MedianStoppingRule
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.bohb import TuneBOHB
from ray.tune.search.optuna import OptunaSearch

from instseg.config import load
from instseg.errors import ConfigError
from tests.conftest import DEMO_CONFIG
from tuning.tune import TrialSummary, TuneSummary, _scheduler, _search, format_trials, smallest_halving_bracket


@pytest.mark.parametrize(
    "setting, kind, sampler",
    [
        ("optuna-tpe", OptunaSearch, optuna.samplers.TPESampler),
        ("optuna-cmaes", OptunaSearch, optuna.samplers.CmaEsSampler),
        ("random", BasicVariantGenerator, None),
        ("bohb", TuneBOHB, None),
    ],
)
def test_each_search_is_built_and_seeded(setting, kind, sampler):
    scheduler = "tune.scheduler=hyperband" if setting == "bohb" else "tune.scheduler=asha"
    search = _search(load(DEMO_CONFIG, [f"tune.search={setting}", "tune.seed=7", scheduler]))
    assert isinstance(search, kind)
    if sampler is not None:
        assert isinstance(search._sampler, sampler)
    if setting == "random":  # Tune's max_concurrent_trials does not reach this one: it is given its own
        assert search.max_concurrent == 2


def test_each_scheduler_is_built():
    assert isinstance(_scheduler(load(DEMO_CONFIG, ["tune.scheduler=asha"])), ASHAScheduler)
    assert isinstance(_scheduler(load(DEMO_CONFIG, ["tune.scheduler=median"])), MedianStoppingRule)
    assert type(_scheduler(load(DEMO_CONFIG, ["tune.scheduler=none"]))) is FIFOScheduler
    assert type(_scheduler(load(DEMO_CONFIG, ["tune.scheduler=hyperband"]))) is HyperBandScheduler
    bohb = _scheduler(load(DEMO_CONFIG, ["tune.scheduler=hyperband", "tune.search=bohb", "train.epochs=8"]))
    assert type(bohb) is HyperBandForBOHB and bohb._max_t_attr == 8
    with pytest.raises(ConfigError, match="tune.scheduler"):
        load(DEMO_CONFIG, ["tune.scheduler=pbt2"])


def test_hyperbands_smallest_halving_bracket_follows_rays_sizes():
    # max_t 2, eta 2: one bracket of 2 trials halved after 1 epoch (the study in test_tune); max_t 8, eta 3: 5
    # trials halved after 2 epochs (bench/tune_efficiency.py, where 2 trials at a time stopped none)
    assert smallest_halving_bracket(2, 2) == 2 and smallest_halving_bracket(8, 3) == 5
    assert smallest_halving_bracket(2, 3) is None


def test_bohb_without_its_hyperband_scheduler_is_refused():
    with pytest.raises(ConfigError, match="tune.search=bohb needs tune.scheduler=hyperband"):
        load(DEMO_CONFIG, ["tune.search=bohb", "tune.scheduler=asha"])


def test_the_trial_table_says_why_each_trial_ended():
    trials = [
        TrialSummary("t1", "r1", {"train.lr": 0.001}, 4, 0.5, 0.6, "completed", "all 4 epochs"),
        TrialSummary(
            "t2",
            "r2",
            {"train.lr": 0.002},
            2,
            0.1,
            0.2,
            "stopped_early",
            "stopped by the median scheduler after epoch 2",
        ),
    ]
    table = format_trials(TuneSummary("p", "uri", "t1", "r1", {}, 0.6, "runs:/r1/bundle", trials))
    lines = table.splitlines()
    assert lines[1].endswith("; all 4 epochs") and lines[2].endswith("; stopped by the median scheduler after epoch 2")
