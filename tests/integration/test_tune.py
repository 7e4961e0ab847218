"""Real Ray Tune studies with nested MLflow runs: Optuna TPE + ASHA, BOHB + HyperBand, PBT."""

import csv
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from instseg.metrics.names import EPOCH, FITNESS, LEARNING_RATE
from instseg.metrics.results import RESULTS_CSV
from ray_jobs.train_loop import CLONED_TAG
from tuning.summary import TrialSummary
from tuning.tune import run_tuning

pytestmark = pytest.mark.integration


def test_two_trial_study_has_nested_runs_with_per_epoch_fitness(local_ray, tiny_config):
    cfg = tiny_config(
        "train.epochs=2",
        "tune.num_samples=2",
        "tune.max_concurrent_trials=2",
        "tune.grace_period=1",
        "run_name=it-study",
    )
    summary = run_tuning(cfg)

    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/total"] == 2
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{summary.parent_run_id}'"
    )
    assert len(children) == 2
    assert {c.info.run_id for c in children} == {t.run_id for t in summary.trials}
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, FITNESS)]
        assert steps[:1] == [1] and steps == sorted(set(steps))
        assert child.data.tags["instseg.stopped_early"] == str(child.info.status == "KILLED").lower()
        epochs = len(steps)
        reason = "stopped by the asha scheduler after epoch 1" if child.info.status == "KILLED" else "all 2 epochs"
        assert child.data.tags["instseg.trial_reason"] == reason and epochs == (1 if reason != "all 2 epochs" else 2)
        if child.info.status == "FINISHED":  # plots are logged before the last report ends the trial
            assert "plots/PR_curve.png" in {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
    sampled_lrs = {t.params["train.lr"] for t in summary.trials}
    space = cfg.tune.search_space["train.lr"]
    assert len(sampled_lrs) == 2 and all(space.low <= lr <= space.high for lr in sampled_lrs)
    assert any(c.info.status == "FINISHED" for c in children)
    best = max(summary.trials, key=lambda t: t.best_fitness)
    assert summary.best_run_id == best.run_id and summary.best_fitness == pytest.approx(best.best_fitness)
    assert summary.best_bundle_uri == f"runs:/{summary.best_run_id}/bundle"
    assert parent.data.tags["instseg.best_run_id"] == summary.best_run_id


def test_bohb_brackets_stop_trials_and_resumed_trials_keep_their_run(local_ray, tiny_config):
    """BOHB (TuneBOHB + HyperBandForBOHB) with 4 trials of 2 epochs, reduction factor 2: Ray's HyperBand fills
    a bracket that runs 2 trials to the end, then one that halves 2 trials after an epoch (the first there waits,
    paused, for the other; the better continues from its checkpoint). A paused trial goes on in its own MLflow
    run: 4 runs, each epoch logged once."""
    cfg = tiny_config(
        "train.epochs=2",
        "tune.num_samples=4",
        "tune.max_concurrent_trials=2",
        "tune.search=bohb",
        "tune.scheduler=hyperband",
        "tune.reduction_factor=2",
        "run_name=bohb",
    )
    summary = run_tuning(cfg)

    client = MlflowClient(summary.tracking_uri)
    children = client.search_runs(
        [client.get_run(summary.parent_run_id).info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{summary.parent_run_id}'",
    )
    assert {c.info.run_id for c in children} == {t.run_id for t in summary.trials} and len(children) == 4
    reasons = []
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, FITNESS)]
        assert steps == list(range(1, len(steps) + 1)), steps  # every epoch once, in order, across a pause
        reasons.append((child.data.tags["instseg.trial_reason"], len(steps), child.info.status))
    assert sorted(reasons) == [("all 2 epochs", 2, "FINISHED")] * 3 + [
        ("stopped by the hyperband scheduler after epoch 1", 1, "KILLED")
    ]
    assert sorted((t.status, t.epochs) for t in summary.trials) == [("completed", 2)] * 3 + [("stopped_early", 1)]


def test_pbt_weak_trial_continues_from_the_strong_ones_checkpoint_with_explored_values(local_ray, tiny_config):
    """Synchronous PBT, 2 trials of 2 epochs, a perturbation after epoch 1, quantile 0.5: the weaker trial continues
    from the stronger one's epoch-1 checkpoint (its weights: the loss history in its results.csv is the stronger's)
    with explored values applied over the restored optimizer (its learning rate follows the explored train.lr), in
    its own MLflow run, every epoch logged once; the checkpoint copies are gone when the study ends."""
    cfg = tiny_config(
        "train.epochs=2",
        "tune.num_samples=2",
        "tune.max_concurrent_trials=2",
        "tune.search=random",
        "tune.scheduler=pbt",
        "tune.perturbation_interval=1",
        "tune.quantile_fraction=0.5",
        "run_name=pbt",
    )
    summary = run_tuning(cfg)

    client = MlflowClient(summary.tracking_uri)
    runs = {t.trial_id: client.get_run(t.run_id) for t in summary.trials}
    assert sorted((t.status, t.epochs) for t in summary.trials) == [("completed", 2)] * 2
    for run in runs.values():
        assert [m.step for m in client.get_metric_history(run.info.run_id, FITNESS)] == [1, 2]
    clones = [trial_id for trial_id, run in runs.items() if CLONED_TAG in run.data.tags]
    assert len(clones) == 1
    clone = next(t for t in summary.trials if t.trial_id == clones[0])
    source = next(t for t in summary.trials if t.trial_id != clone.trial_id)
    assert runs[clone.trial_id].data.tags[CLONED_TAG] == f"{source.trial_id}@1"
    assert clone.reason == f"all 2 epochs; continued trial {source.trial_id} from epoch 1"

    # explored: scaled by 0.8 / 1.2 or drawn anew, inside the search space; the run keeps the values it started with
    space = cfg.tune.search_space["train.lr"]
    assert space.low <= clone.params["train.lr"] <= space.high
    assert float(runs[clone.trial_id].data.params["train.lr"]) != pytest.approx(clone.params["train.lr"])

    def metric(trial: TrialSummary, key: str, step: int) -> float:
        return next(m.value for m in client.get_metric_history(trial.run_id, key) if m.step == step)

    # same point of the same schedule: the learning rates of epoch 2 are in the ratio of the base values
    lr_ratio = metric(clone, LEARNING_RATE, 2) / metric(source, LEARNING_RATE, 2)
    assert lr_ratio == pytest.approx(clone.params["train.lr"] / source.params["train.lr"], rel=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        results = client.download_artifacts(clone.run_id, RESULTS_CSV, tmp)
        rows = list(csv.DictReader(open(results)))
    assert [float(row[EPOCH]) for row in rows] == [1.0, 2.0]
    assert float(rows[0]["train/loss"]) == pytest.approx(metric(source, "train/loss", 1))
    assert float(rows[0]["train/loss"]) != pytest.approx(metric(clone, "train/loss", 1))
    assert not (Path(cfg.ray.storage_path) / "pbt" / "pbt").exists()
