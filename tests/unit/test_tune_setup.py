"""The study's searcher and scheduler come from the config (tune.search, tune.scheduler); the trial table says
why each trial ended. (Each runs a real study in the integration tests: asha + optuna-tpe and hyperband + bohb in
test_tune, pbt + random also in test_tune, hyperband + random in test_tune_resume, median + random in test_flow,
none + optuna-cmaes in test_resilience.)"""

import optuna
import pytest
import torch
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB, HyperBandScheduler, MedianStoppingRule
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.bohb import TuneBOHB
from ray.tune.search.optuna import OptunaSearch

from instseg.config import SearchDimension, TrainConfig, load
from instseg.engine.optim import apply_optimizer_settings, build_optimizer, build_scheduler
from instseg.errors import ConfigError
from tests.helpers import DEMO_CONFIG
from tuning.algorithms import build_searcher, build_trial_scheduler, smallest_halving_bracket
from tuning.pbt import TrainCheckpointPBT, WithinSearchSpace
from tuning.summary import TrialSummary, TuneSummary, format_trials


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
    search = build_searcher(load(DEMO_CONFIG, [f"tune.search={setting}", "tune.seed=7", scheduler]))
    assert isinstance(search, kind)
    if sampler is not None:
        assert isinstance(search._sampler, sampler)
    if setting == "random":  # Tune's max_concurrent_trials does not reach this one: it is given its own
        assert search.max_concurrent == 2


def test_each_scheduler_is_built():
    assert isinstance(build_trial_scheduler(load(DEMO_CONFIG, ["tune.scheduler=asha"]), "s"), ASHAScheduler)
    assert isinstance(build_trial_scheduler(load(DEMO_CONFIG, ["tune.scheduler=median"]), "s"), MedianStoppingRule)
    assert type(build_trial_scheduler(load(DEMO_CONFIG, ["tune.scheduler=none"]), "s")) is FIFOScheduler
    assert type(build_trial_scheduler(load(DEMO_CONFIG, ["tune.scheduler=hyperband"]), "s")) is HyperBandScheduler
    bohb = build_trial_scheduler(
        load(DEMO_CONFIG, ["tune.scheduler=hyperband", "tune.search=bohb", "train.epochs=8"]), "s"
    )
    assert type(bohb) is HyperBandForBOHB and bohb._max_t_attr == 8
    pbt = build_trial_scheduler(load(DEMO_CONFIG, [*PBT, "tune.perturbation_interval=3"]), "s")
    assert type(pbt) is TrainCheckpointPBT and pbt._synch and pbt._perturbation_interval == 3
    assert set(pbt._hyperparam_mutations) == {"train.lr", "train.weight_decay"} and pbt.study == "s"
    with pytest.raises(ConfigError, match="tune.scheduler"):
        load(DEMO_CONFIG, ["tune.scheduler=pbt2"])


PBT = ["tune.scheduler=pbt", "tune.search=random", "tune.num_samples=2"]


@pytest.mark.parametrize(
    "overrides, needs",
    [
        (["tune.search=optuna-tpe"], "tune.search=random (got optuna-tpe"),
        (
            ["tune.num_samples=5", "tune.max_concurrent_trials=2"],
            "tune.num_samples (5) <= tune.max_concurrent_trials (2)",
        ),
        (["train.patience=3"], "train.patience=0"),
        (["tune.search_space={model.min_size: {type: choice, values: [128, 160]}}"], "(got model.min_size)"),
    ],
)
def test_pbt_refuses_what_it_cannot_explore_or_run(overrides, needs):
    with pytest.raises(ConfigError, match="tune.scheduler=pbt needs") as refused:
        load(DEMO_CONFIG, [*PBT, *overrides])
    assert needs in str(refused.value)


def test_pbt_keeps_explored_values_in_the_search_space():
    keep = WithinSearchSpace(
        {
            "train.lr": SearchDimension(type="loguniform", low=0.001, high=0.01),
            "train.momentum": SearchDimension(type="uniform", low=0.8, high=0.95),
            "data.batch_size": SearchDimension(type="randint", low=2, high=5),
            "train.optimizer": SearchDimension(type="choice", values=["sgd", "adamw"]),
        }
    )
    explored = keep({"train.lr": 0.012, "train.momentum": 0.64, "data.batch_size": 6, "train.optimizer": "adamw"})
    assert explored == {"train.lr": 0.01, "train.momentum": 0.8, "data.batch_size": 4, "train.optimizer": "adamw"}
    assert keep({"train.lr": 0.005, "train.momentum": 0.9})["train.lr"] == 0.005


def test_restored_optimizer_takes_the_configured_values_at_the_same_point_of_its_schedule():
    """PBT's explore step: another trial's optimizer and schedule state, with this trial's lr, decay and momentum."""
    model = torch.nn.Linear(3, 2)
    stored = TrainConfig(lr=0.01, weight_decay=1e-4, momentum=0.9, warmup_iters=4, epochs=2)
    optimizer = build_optimizer(model, stored)
    scheduler = build_scheduler(optimizer, stored, steps_per_epoch=5)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = optimizer.state_dict(), scheduler.state_dict()
    lr_at_step_3 = optimizer.param_groups[0]["lr"]

    explored = TrainConfig(lr=0.012, weight_decay=5e-4, momentum=0.8, warmup_iters=4, epochs=2)
    optimizer = build_optimizer(model, explored)
    scheduler = build_scheduler(optimizer, explored, steps_per_epoch=5)
    optimizer.load_state_dict(state[0])
    scheduler.load_state_dict(state[1])
    apply_optimizer_settings(optimizer, scheduler, explored, lr=0.012)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(lr_at_step_3 * 1.2)
    assert (group["weight_decay"], group["momentum"], scheduler.last_epoch) == (5e-4, 0.8, 3)
    optimizer.step()
    scheduler.step()  # the schedule goes on from step 3, scaled to the explored base value
    assert group["lr"] == pytest.approx(0.012 * scheduler.lr_lambdas[0](4))


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
