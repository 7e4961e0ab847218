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
