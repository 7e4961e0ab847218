"""Two promotions racing for one registered model, in two processes against one MLflow store: exactly one
champion remains, and it is the better challenger whichever commits first (the later one is judged again
against the new champion). Every decision is a run in the promotions experiment and tags on both versions.

The gate's scoring is its seam here (a table of fitness by version, slow enough for the two to overlap); the
registry, its aliases, the lock and the records are MLflow's own."""

import multiprocessing
import re
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from instseg.config import ModelConfig
from instseg.data.coco import LabelMap
from instseg.errors import InstsegError
from instseg.metrics.names import FITNESS
from instseg.models.bundle import write_bundle
from instseg.models.factory import build_model
from instseg.tracking.gate import PROMOTIONS_EXPERIMENT, better_by, promote
from instseg.tracking.registry import CHAMPION, aliases, register_bundle
from instseg.tracking.runs import create_run

pytestmark = pytest.mark.integration

MODEL = "raced"
FITNESS_BY_VERSION = {"1": 0.5, "2": 0.7, "3": 0.6}


def _score(bundle_dir: Path) -> dict[str, float]:
    time.sleep(1.0)  # long enough for the other process to score too before either commits
    (folder,) = [part for part in bundle_dir.parts if re.fullmatch(r"(challenger|champion)-v\d+", part)]
    return {FITNESS: FITNESS_BY_VERSION[folder.rsplit("-v", 1)[1]]}


def _promote_in_a_process(tracking_uri: str, version: str, start: Any, out: Any) -> None:
    start.wait()
    result = promote(
        tracking_uri,
        MODEL,
        _score,
        version=version,
        split="val",
        fingerprint=lambda: "data-1",
        decided_by=f"racer {version}",
    )
    out.put((version, result.promoted, result.champion_version, result.champion_after))


def _tiny_bundle(folder: Path) -> Path:
    cfg = ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160)
    labels = LabelMap.from_categories([{"id": 1, "name": "thing"}])
    return write_bundle(folder, build_model(cfg, labels.num_classes).state_dict(), cfg.model_dump(), labels.to_dict())


def test_two_racing_promotions_leave_the_better_one_champion(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bundle = _tiny_bundle(tmp_path / "bundle")
    client = MlflowClient(uri)
    for _ in FITNESS_BY_VERSION:
        run_id = create_run(uri, "trained", run_name="t")
        client.set_terminated(run_id, "FINISHED")
        register_bundle(uri, run_id, bundle, MODEL)
    first = promote(uri, MODEL, _score, version="1", split="val", fingerprint=lambda: "data-1")
    assert first.promoted and aliases(uri, MODEL)[CHAMPION] == "1"

    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    racers = [context.Process(target=_promote_in_a_process, args=(uri, v, start, out)) for v in ("2", "3")]
    for racer in racers:
        racer.start()
    start.set()
    for racer in racers:
        racer.join(timeout=180)
    assert all(racer.exitcode == 0 for racer in racers), [racer.exitcode for racer in racers]
    results = {version: (promoted, against, after) for version, promoted, against, after in (out.get() for _ in racers)}

    assert aliases(uri, MODEL)[CHAMPION] == "2"  # the better challenger, whichever committed first
    assert results["2"][0] is True and results["3"][2] in ("2", "3")
    if results["3"][0]:  # 3 committed first, against 1; then 2 was judged again, against 3
        assert results["2"][1] == "3"
    else:  # 2 committed first: 3 was judged against it and lost
        assert results["3"][1] == "2" and results["3"][2] == "2"
    assert not client.search_registered_models(f"name = '{MODEL}.promotion-lock'")  # released

    experiment = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    records = client.search_runs([experiment.experiment_id])
    assert len(records) == 3 and {r.data.tags["promotion.decided_by"] for r in records} >= {"racer 2", "racer 3"}
    for record in records:
        assert record.data.params["data_fingerprint"] == "data-1" and record.info.status == "FINISHED"
    two = client.get_model_version(MODEL, "2").tags
    assert two["promotion.decision"] == "promoted" and two["promotion.data_fingerprint"] == "data-1"
    assert float(two[f"promotion.challenger_{FITNESS}"]) == 0.7
    challenged = client.get_model_version(MODEL, results["2"][1]).tags  # the champion 2 replaced knows it
    assert challenged["challenged.by_version"] == "2" and challenged["challenged.decision"] == "promoted"


def test_data_that_changes_while_scoring_promotes_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_bundle(uri, create_run(uri, "trained", run_name="t"), _tiny_bundle(tmp_path / "bundle"), MODEL)
    versions = iter(["data-1", "data-2"])
    with pytest.raises(InstsegError, match="changed while raced was being scored"):
        promote(uri, MODEL, lambda folder: {FITNESS: 0.5}, split="val", fingerprint=lambda: next(versions))
    assert CHAMPION not in aliases(uri, MODEL)


def test_a_challenger_must_gain_at_least_the_minimum_improvement():
    assert better_by(0.71, 0.70, 0.0) and not better_by(0.70, 0.70, 0.0)  # a tie keeps the champion
    assert not better_by(0.705, 0.70, 0.01) and better_by(0.72, 0.70, 0.01)
