"""The Prefect flow (tune -> register -> promote) on RayTaskRunner under a real Prefect test server,
then prediction with the champion loaded back by pycocotools."""

import asyncio
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from instseg.cli import main as cli_main
from instseg.data.ground_truth import load_coco
from instseg.evaluation import evaluate_on_split
from instseg.metrics.names import FITNESS
from instseg.models.bundle import load_bundle
from instseg.tracking.gate import promote
from instseg.tracking.pyfunc_model import encode_image_file
from instseg.tracking.registry import CHALLENGER, CHAMPION, aliases, download_bundle, register_bundle
from tests.helpers import DEMO_CONFIG, TINY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _markdown_artifacts(keys: list[str]) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    return {artifact.key: artifact.data for artifact in found}


async def _flow_run_states(flow_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [run.state.type.value for run in runs]


def test_flow_tunes_registers_promotes_and_champion_predicts(
    prefect_server, local_ray, synth_root, tmp_path, monkeypatch
):
    from flows.pipeline import FLOW_NAME, tune_register_promote
    from flows.reports import PROMOTION_ARTIFACT, TRIALS_ARTIFACT
    from instseg.data.coco import dataset_fingerprint
    from instseg.tracking.registry import registered_from

    monkeypatch.chdir(tmp_path)  # relative paths in the overrides resolve against the flow's cwd
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        *TINY,
        f"data.root={synth_root}",
        "tracking.uri=sqlite:///mlflow.db",
        "ray.storage_path=ray_results",
        "train.epochs=1",
        "tune.num_samples=2",
        "registry.model_name=flow-test",
        "tune.search=random",
        "tune.scheduler=median",
    ]
    result = tune_register_promote(config_path=str(DEMO_CONFIG), overrides=overrides)

    assert asyncio.run(_flow_run_states(FLOW_NAME)) == ["COMPLETED"]
    # random search, median stopping rule: one epoch each, both complete (the rule judges from grace_period on)
    assert [(t["status"], t["reason"]) for t in result["tune"]["trials"]] == [("completed", "all 1 epochs")] * 2
    # what the run leaves in the Prefect UI: the trials, and the promotion decision with the data it was judged on
    artifacts = asyncio.run(_markdown_artifacts([TRIALS_ARTIFACT, PROMOTION_ARTIFACT]))
    trials = artifacts[TRIALS_ARTIFACT]
    assert all(f"| `{t['trial_id']}` | completed | 1 |" in trials for t in result["tune"]["trials"])
    assert f"`{result['tune']['best_run_id']}`" in trials and "all 1 epochs" in trials
    decision = artifacts[PROMOTION_ARTIFACT]
    assert decision.startswith("# flow-test: promoted")
    assert f"split `val` of the dataset with fingerprint `{dataset_fingerprint(synth_root, ('val',))}`" in decision
    assert f"| {FITNESS} | {result['promotion']['challenger_fitness']:.5f} | - |" in decision
    # a retried registration finds the version the first attempt made instead of adding another
    tags = {"study_run_id": result["tune"]["parent_run_id"], "trial_id": result["tune"]["best_trial_id"]}
    assert registered_from(tracking_uri, "flow-test", result["tune"]["best_run_id"], tags) == "1"
    assert registered_from(tracking_uri, "flow-test", result["tune"]["best_run_id"], {"study_run_id": "other"}) is None
    assert result["registration"]["version"] == "1"
    assert result["promotion"]["promoted"] and result["promotion"]["champion_version"] is None
    assert aliases(tracking_uri, "flow-test") == {CHALLENGER: "1", CHAMPION: "1"}
    client = MlflowClient(tracking_uri)
    version = client.get_model_version("flow-test", "1")
    assert version.run_id == result["tune"]["best_run_id"]
    assert float(version.tags[f"promotion.challenger_{FITNESS}"]) == pytest.approx(
        result["promotion"]["challenger_fitness"]
    )
    segm_map = result["promotion"]["challenger_metrics"]["val/segm_map"]
    assert float(version.tags["promotion.challenger_segm_map"]) == pytest.approx(segm_map)

    # the champion drawn on a validation image: a PNG beside the Ray results and in the champion's run
    shown = result["showcase"]
    assert (shown["version"], shown["run_id"]) == ("1", version.run_id)
    png = Path(shown["path"])
    assert png.parent == tmp_path / "ray_results" / "champions" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"champion/{png.name}" in {a.path for a in client.list_artifacts(version.run_id, "champion")}
    assert shown["artifact_uri"] == f"runs:/{version.run_id}/champion/{png.name}"

    # the registered model is weights + config: no pickled Python objects anywhere in it
    model_dir = download_bundle(tracking_uri, "models:/flow-test@champion", tmp_path / "dl").parent.parent
    assert not list(model_dir.rglob("*.pkl")) and not list(model_dir.rglob("python_model.pkl"))

    images = sorted(str(p) for p in (synth_root / "images" / "val").glob("*.jpg"))
    out = tmp_path / "preds.json"
    assert (
        cli_main(
            [
                "predict",
                "--model",
                "models:/flow-test@champion",
                *images,
                "--out",
                str(out),
                "--tracking-uri",
                tracking_uri,
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    gt = load_coco(synth_root / "annotations" / "instances_val.json")
    detections = gt.loadRes(results)
    assert set(detections.getImgIds()) <= set(gt.getImgIds()) and len(detections.anns) == len(results)


def test_promotion_keeps_champion_unless_strictly_better(local_ray, tiny_config, tmp_path):
    """Register one bundle twice: equal fitness must not move `champion`; both numbers are recorded."""
    from ray_jobs.train import run_training

    cfg = tiny_config("train.epochs=1", "registry.model_name=gate-test")
    trained = run_training(cfg)
    bundle = download_bundle(trained.tracking_uri, trained.bundle_uri, tmp_path / "b")

    def score(bundle_dir):
        model, label_map, _ = load_bundle(bundle_dir)
        return evaluate_on_split(model, label_map, cfg.data, cfg.data.val_split, cfg.metrics.fitness_weights)

    assert register_bundle(trained.tracking_uri, trained.run_id, bundle, "gate-test") == "1"
    assert "MLFLOW_TRACKING_URI" not in os.environ, "registering must not redirect later default lookups"
    first = promote(trained.tracking_uri, "gate-test", score)
    assert first.promoted and first.champion_after == "1"
    assert register_bundle(trained.tracking_uri, trained.run_id, bundle, "gate-test") == "2"
    second = promote(trained.tracking_uri, "gate-test", score)
    assert not second.promoted and second.champion_fitness == pytest.approx(second.challenger_fitness)
    assert aliases(trained.tracking_uri, "gate-test") == {CHALLENGER: "2", CHAMPION: "1"}
    tags = MlflowClient(trained.tracking_uri).get_model_version("gate-test", "2").tags
    assert tags["promotion.decision"] == "kept champion" and tags["promotion.champion_version"] == "1"
    assert MlflowClient(trained.tracking_uri).get_run(trained.run_id).info.status == "FINISHED"

    # the registry model serves through MLflow's pyfunc loader (models-from-code, no pickle)
    import mlflow.pyfunc

    mlflow.set_tracking_uri(trained.tracking_uri)
    served = mlflow.pyfunc.load_model("models:/gate-test@champion")
    images = sorted((Path(cfg.data.root) / "images" / "val").glob("*.jpg"))[:2]
    frame = served.predict(pd.DataFrame({"image": [encode_image_file(p) for p in images], "image_id": [11, 12]}))
    assert {"image_id", "category_id", "category", "bbox", "score", "segmentation"} <= set(frame.columns)
    assert set(frame["image_id"]) <= {11, 12}
