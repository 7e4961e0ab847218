"""The tune -> register -> promote -> showcase flow on prefect_ray.RayTaskRunner.

A run trains only while it holds a slot of the global concurrency limit GPU_LIMIT, so two scheduled studies
never train on the same GPUs at once; every task has a timeout.

The task that launches tuning asks Ray for a sliver of CPU only (its trials' Train workers hold
the CPUs/GPUs); promotion evaluates two models and takes one CPU. Each task returns a plain
dict summary that the next task takes explicitly. Registration and promotion are retried with backoff (a
retried registration reuses the version an earlier attempt created; promotion only reads scores and moves
an alias); a half-done study is not retried. The run leaves markdown artifacts for the Prefect UI: the
trials (flows.reports) and the promotion decision.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from flows.reports import PROMOTION_ARTIFACT, TRIALS_ARTIFACT, promotion_markdown, trials_markdown
from instseg.config import Config, load, resolve_paths
from instseg.evaluation import render_example
from instseg.models.bundle import load_bundle
from instseg.promotion import Registration, describe, promote_on_split, register_run
from instseg.tracking.registry import CHALLENGER, download_bundle, model_version_run, registered_from
from instseg.tracking.runs import RunLogger
from ray_jobs.driver_run import preflight
from ray_jobs.runtime import ORCHESTRATION_CPUS, ray_target, start_local_ray
from tuning.summary import TuneSummary
from tuning.tune import run_tuning

FLOW_NAME = "instseg-tune-register-promote"
# how a worker finds it (flows.deploy, prefect.yaml): a module path, so that Ray workers unpickle its tasks from
# flows.pipeline (a file path would load it as a module named "pipeline", which they cannot import)
FLOW_ENTRYPOINT = "flows.pipeline:tune_register_promote"
GPU_LIMIT = "gpu"  # Prefect global concurrency limit: studies training at once (flows.deploy creates it)
PROMOTION_CPUS = 1
SHOWCASE_ARTIFACT_PATH = "champion"
RETRIES = 3  # registration and promotion: an MLflow hiccup should not cost a finished study
RETRY_BACKOFF_S = 10  # then 20, 40 (Prefect's exponential backoff, with jitter)
RETRY_DELAYS = exponential_backoff(backoff_factor=RETRY_BACKOFF_S)
# a stuck task fails the flow run instead of holding the `gpu` slot for ever; a study's own length is bounded by
# its config (trials x epochs), so its limit is generous
TUNE_TIMEOUT_S = 24 * 3600
REGISTER_TIMEOUT_S = 15 * 60
PROMOTE_TIMEOUT_S = 2 * 3600
SHOWCASE_TIMEOUT_S = 15 * 60


class LocalOrClusterRayTaskRunner(RayTaskRunner):
    """RayTaskRunner that joins `address` (or RAY_ADDRESS) when there is one, else starts a private local
    instance the way `instseg train` does (ray_jobs.runtime.start_local_ray: right beside other instances on the
    machine, such as another flow run's) and shuts it down when the flow run ends. A bare ray.init() would join
    whatever cluster `ray start --head` recorded last."""

    def __enter__(self) -> "LocalOrClusterRayTaskRunner":
        self._started_local = False
        if not ray.is_initialized() and ray_target(self.address) == "local":
            start_local_ray(**self.init_kwargs)
            self._started_local = True
        return super().__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            if getattr(self, "_started_local", False):
                ray.shutdown()


@task(name="tune", timeout_seconds=TUNE_TIMEOUT_S)
def tune_task(config: dict[str, Any]) -> dict[str, Any]:
    cfg = Config.model_validate(config)
    summary = run_tuning(cfg, preflighted=True)  # by the flow, before it dispatched this task
    experiment = MlflowClient(cfg.tracking.uri).get_experiment_by_name(cfg.tracking.experiment)
    create_markdown_artifact(
        markdown=trials_markdown(summary, experiment.experiment_id if experiment else None),
        key=TRIALS_ARTIFACT,
        description=f"trials of study {summary.parent_run_id}",
    )
    return summary.to_dict()


@task(name="register", timeout_seconds=REGISTER_TIMEOUT_S, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)
def register_task(config: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    cfg = Config.model_validate(config)
    summary = TuneSummary.from_dict(tuned)
    name = cfg.registry.model_name
    tags = {"study_run_id": summary.parent_run_id, "trial_id": summary.best_trial_id}
    version = registered_from(cfg.tracking.uri, name, summary.best_run_id, tags)
    if version is None:
        version = register_run(
            cfg.tracking.uri,
            summary.best_run_id,
            name,
            bundle_uri=summary.best_bundle_uri,
            tags={**tags, "tune_fitness": summary.best_fitness},
        )
    else:  # an earlier attempt registered it and failed after
        MlflowClient(cfg.tracking.uri).set_registered_model_alias(name, CHALLENGER, version)
    get_run_logger().info("registered %s version %s (challenger)", name, version)
    return Registration(cfg.registry.model_name, version, summary.tracking_uri).to_dict()  # (redacted)


@task(name="promote", timeout_seconds=PROMOTE_TIMEOUT_S, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)
def promote_task(config: dict[str, Any], registered: dict[str, Any]) -> dict[str, Any]:
    cfg = Config.model_validate(config)
    decided_by = f"prefect flow run {flow_run.name} ({flow_run.id})"
    registration = Registration.from_dict(registered)
    result = promote_on_split(cfg, registration.model_name, registration.version, decided_by=decided_by)
    get_run_logger().info(describe(result))
    create_markdown_artifact(
        markdown=promotion_markdown(result.to_dict()),
        key=PROMOTION_ARTIFACT,
        description=describe(result),
    )
    return result.to_dict()


@task(name="showcase", timeout_seconds=SHOWCASE_TIMEOUT_S)
def showcase_task(config: dict[str, Any], promoted: dict[str, Any]) -> dict[str, Any]:
    """One validation image with the champion's masks drawn beside its ground truth, logged to the champion's
    run (artifact champion/) and kept under the Ray storage path when that is a local folder."""
    cfg = Config.model_validate(config)
    name, version = promoted["model_name"], promoted["champion_after"]
    with tempfile.TemporaryDirectory(prefix="instseg-showcase-") as tmp:
        bundle = download_bundle(cfg.tracking.uri, f"models:/{name}/{version}", Path(tmp) / "bundle")
        model, label_map, _ = load_bundle(bundle)
        drawn = Path(tmp) / f"{name}-v{version}-{cfg.data.val_split}.png"
        image_id = render_example(model, label_map, cfg.data, cfg.data.val_split, drawn, f"champion {name} v{version}")
        run_id = model_version_run(cfg.tracking.uri, name, version)
        RunLogger(cfg.tracking.uri, run_id).log_artifact(drawn, SHOWCASE_ARTIFACT_PATH)
        kept = None
        if "://" not in cfg.ray.storage_path:
            kept = Path(cfg.ray.storage_path) / "champions" / drawn.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(drawn, kept)
    get_run_logger().info("champion v%s on %s image %s: %s", version, cfg.data.val_split, image_id, kept or "in MLflow")
    return {
        "model_name": name,
        "version": version,
        "run_id": run_id,
        "image_id": image_id,
        "path": str(kept) if kept else None,
        "artifact_uri": f"runs:/{run_id}/{SHOWCASE_ARTIFACT_PATH}/{drawn.name}",
    }


@flow(name=FLOW_NAME, task_runner=LocalOrClusterRayTaskRunner(), log_prints=True)
def tune_register_promote(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the config (paths resolved against the flow's cwd), then tune, register, promote, and draw the
    champion's predictions on a validation image."""
    cfg = resolve_paths(load(config_path, overrides or []))
    preflight(cfg)  # a bad dataset or weights file fails the flow before any task is dispatched
    config = cfg.model_dump()
    with remote_options(num_cpus=ORCHESTRATION_CPUS):
        # one study per `gpu` slot at a time: a second scheduled run waits here for the first to finish training
        with concurrency(GPU_LIMIT, occupy=1):
            tuned = tune_task.submit(config).result()
        registered = register_task.submit(config, tuned).result()
    with remote_options(num_cpus=PROMOTION_CPUS):
        promoted = promote_task.submit(config, registered).result()
        shown = showcase_task.submit(config, promoted).result()
    return {"tune": tuned, "registration": registered, "promotion": promoted, "showcase": shown}
