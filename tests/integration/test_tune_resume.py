"""A study stopped by SIGTERM after its second trial completed, then rerun with the same run_name: it resumes
(Tuner.restore) into the same MLflow parent run, the finished trials are not rerun, and a finished study's name
is refused. The study uses HyperBand with random search: HyperBand's first bracket runs 2 trials to the end."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from instseg.config import load, resolve_paths
from instseg.errors import ConfigError
from instseg.metrics.names import FITNESS
from instseg.tracking.runs import child_runs, find_run
from tests.helpers import DEMO_CONFIG, ROOT, isolated_overrides
from tuning.tune import TRIAL_ID_TAG, run_tuning

pytestmark = pytest.mark.integration

STUDY = "resumable"


def _trials_done(tracking_uri: str, epochs: int) -> tuple[str | None, list[str]]:
    """The study's parent run and its trial runs that have logged their last epoch (a scheduler ends a trial at
    max_t before its own code closes the run, so the run's status says nothing yet)."""
    parent = find_run(tracking_uri, "instseg-demo", STUDY, kind="study")
    if parent is None:
        return None, []
    client = MlflowClient(tracking_uri)
    runs = child_runs(tracking_uri, parent.info.run_id)
    done = [run.info.run_id for run in runs if epochs in {step for step, _ in _history(client, run.info.run_id)}]
    return parent.info.run_id, done


def _history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, FITNESS))


def test_a_study_stopped_after_two_trials_resumes_where_it_was(local_ray, synth_root, tmp_path):
    overrides = [
        *isolated_overrides(synth_root, tmp_path),
        "train.epochs=2",
        "tune.num_samples=4",
        "tune.max_concurrent_trials=2",
        "tune.scheduler=hyperband",
        "tune.search=random",
        "tune.reduction_factor=2",
        f"run_name={STUDY}",
    ]
    cfg = resolve_paths(load(DEMO_CONFIG, overrides))
    tracking_uri = cfg.tracking.uri
    log = tmp_path / "first-driver.log"
    with log.open("w") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "tuning.tune", "--config", str(DEMO_CONFIG), *overrides],
            cwd=ROOT,
            env=os.environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        parent_id, done = None, []
        while len(done) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            parent_id, done = _trials_done(tracking_uri, epochs=2)
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
    output = log.read_text()
    assert len(done) == 2 and first.returncode == 130, output[-4000:]
    assert f"rerun with run_name={STUDY} to resume it" in output
    client = MlflowClient(tracking_uri)
    assert client.get_run(parent_id).info.status == "KILLED"
    before = {run_id: _history(client, run_id) for run_id in done}
    assert all(len(history) == 2 for history in before.values())

    summary = run_tuning(cfg)

    assert summary.parent_run_id == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = child_runs(tracking_uri, parent_id)
    assert len(children) == 4 and len({c.data.tags[TRIAL_ID_TAG] for c in children}) == 4  # no trial run twice
    assert {t.run_id for t in summary.trials} == {c.info.run_id for c in children}
    for run_id, history in before.items():  # the finished trials were not trained again
        assert _history(client, run_id) == history and client.get_run(run_id).info.status == "FINISHED"
    for child in children:
        steps = [step for step, _ in _history(client, child.info.run_id)]
        assert steps == list(range(1, len(steps) + 1)), steps
    assert sorted(t.epochs for t in summary.trials) == [1, 2, 2, 2]  # HyperBand's second bracket stopped one

    with pytest.raises(ConfigError, match=f"run_name '{STUDY}' already finished"):
        run_tuning(cfg)


def test_a_finished_or_changed_study_is_refused_before_any_trial(tiny_config, local_ray):
    """Resuming needs the same settings: another search space or epoch count would mix two studies in one."""
    cfg = tiny_config("train.epochs=1", "tune.num_samples=1", "tune.scheduler=none", "run_name=changed")
    run_tuning(cfg)
    with pytest.raises(ConfigError, match="already finished"):
        run_tuning(cfg)
    tracking_uri = cfg.tracking.uri
    parent = find_run(tracking_uri, cfg.tracking.experiment, "changed", kind="study")
    MlflowClient(tracking_uri).update_run(parent.info.run_id, status="KILLED")  # as if it had been interrupted
    with pytest.raises(ConfigError, match=r"other settings \(train.epochs\)"):
        run_tuning(tiny_config("train.epochs=2", "tune.num_samples=1", "tune.scheduler=none", "run_name=changed"))
    assert Path(cfg.ray.storage_path, "changed").is_dir()
