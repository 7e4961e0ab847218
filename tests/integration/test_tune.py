"""A real 2-trial Ray Tune study (Optuna TPE + ASHA) with nested MLflow runs."""

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from instseg.metrics.names import FITNESS
from tuning.tune import run_tuning

pytestmark = pytest.mark.integration


def test_two_trial_study_has_nested_runs_with_per_epoch_fitness(local_ray, tiny_config):
    cfg = tiny_config("train.epochs=2", "tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.grace_period=1",
                      "run_name=it-study")
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
    cfg = tiny_config("train.epochs=2", "tune.num_samples=4", "tune.max_concurrent_trials=2", "tune.search=bohb",
                      "tune.scheduler=hyperband", "tune.reduction_factor=2", "run_name=bohb")
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
