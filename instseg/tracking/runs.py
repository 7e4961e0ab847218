"""MLflow runs: experiments, (nested) runs, a rank-0 run logger, and the quiet, reachable store they need.

Runs are created by drivers (the train entry point, the tuning study, each trial driver) and
their ids are handed down explicitly; workers only log into a run id they were given.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from instseg.errors import ConfigError, first_line
from instseg.redaction import redact

LIBRARIES = ("torch", "torchvision", "ray", "mlflow", "prefect", "optuna", "pycocotools", "instseg")
_MAX_PARAM_LENGTH = 6000
DATASET_CONTEXT_TAG = "mlflow.data.context"  # the tag MLflow's UI reads a dataset input's role from


# the client's own defaults retry an unreachable server for about four minutes per call
QUICK_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def quick_requests() -> Any:
    """MLflow HTTP calls in the block fail within seconds instead of retrying for minutes: for callers that
    have a better plan than waiting (buffer and send later, or tell the user now). MLflow reads these
    variables on every request."""
    return mlflow_env(QUICK_RETRIES)


def quiet_urls(uri: str) -> Any:
    """MLflow prints "View run ... at: URL" when a run ends on a server, credentials and all: not for a URI
    that has some."""
    has_credentials = redact(uri) != uri
    return mlflow_env({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"} if has_credentials else {})


@contextmanager
def mlflow_env(settings: Mapping[str, str]) -> Iterator[None]:
    """MLflow settings (environment variables) for the block only."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_tracking_reachable(uri: str) -> None:
    """A tracking server answers within seconds, or ConfigError names it (before any Ray worker starts)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with quick_requests():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 (connection refused, timeout, 401, TLS: all mean "not usable")
        raise ConfigError(f"cannot reach the MLflow tracking server at {redact(uri)}: {first_line(exc)}") from None


def _default_artifact_location(uri: str) -> str | None:
    """Beside the sqlite file, so artifacts never land in whatever cwd a worker has."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_default_artifact_location(client.tracking_uri))


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def create_run(
    uri: str,
    experiment: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """A new RUNNING run (a child of `parent_run_id` when given); returns its id."""
    client = MlflowClient(uri)
    all_tags = {**library_versions(), **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    if run_name:
        all_tags[MLFLOW_RUN_NAME] = run_name
    run = client.create_run(ensure_experiment(client, experiment), tags=all_tags, run_name=run_name)
    return run.info.run_id


class RunLogger:
    """Logs into one existing run by id, without touching MLflow's global active-run state."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """timestamp_ms: when the values were measured (default now). The same batch sent twice with the same
        timestamp is stored once (MLflow drops rows identical in key, value, step and time): a retry after a
        timeout whose request did arrive adds nothing."""
        now = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset_inputs(self, root: str, fingerprint: str, splits: Mapping[str, Mapping[str, Any]]) -> None:
        """The run's data as MLflow dataset inputs, one per split (context -> {"split": name, "images": n, ...}):
        named root/split, its digest the dataset fingerprint, its profile the split's counts."""
        inputs = [
            DatasetInput(
                Dataset(
                    name=f"{Path(root).name}/{info['split']}",
                    digest=fingerprint,
                    source_type="local",
                    source=json.dumps({"uri": str(root)}),
                    profile=json.dumps(dict(info)),
                ),
                tags=[InputTag(DATASET_CONTEXT_TAG, context)],
            )
            for context, info in splits.items()
        ]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED."""
        with quiet_urls(self.client.tracking_uri):
            self.client.set_terminated(self.run_id, status=status)

    def finish_after_error(self, status: str) -> None:
        """finish() on the way out of a failure: if MLflow cannot take it either, say so in one line and let the
        original error be the one that surfaces (the run is then closed by the next start: tracking.liveness)."""
        try:
            self.finish(status)
        except Exception as exc:  # noqa: BLE001 (an outage must not replace the error being raised)
            print(f"could not mark MLflow run {self.run_id} {status}: {first_line(exc)}", flush=True)

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def logged_steps(self, key: str) -> set[int]:
        return {step for step, _ in self.history(key)}

    def reopen(self, tags: dict[str, Any]) -> None:
        """Mark a stopped or crashed run RUNNING again (a resumed run continues it), tagged with who now drives it
        (`tags`: the new driver's, instseg.tracking.liveness)."""
        self.client.update_run(self.run_id, status="RUNNING")
        self.set_tags(tags)

    def append_tag(self, key: str, value: Any) -> None:
        """Add `value` to a comma-separated tag (e.g. every epoch a run was resumed from)."""
        current = self.client.get_run(self.run_id).data.tags.get(key)
        self.client.set_tag(self.run_id, key, f"{current},{value}" if current else str(value))


def find_run(uri: str, experiment: str, run_name: str, kind: str) -> Any | None:
    """The newest run of `kind` named `run_name` in `experiment`, or None."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{MLFLOW_RUN_NAME}` = '{run_name}' and tags.`instseg.kind` = '{kind}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def child_runs(uri: str, parent_run_id: str) -> list[Any]:
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
        max_results=10000,
    )


def start_system_metrics(
    uri: str, run_id: str, interval_s: float, node_id: str | None = None, resume: bool = False
) -> Any:
    """MLflow's system metrics monitor (system/cpu_utilization_percentage, system/gpu_0_memory_usage_megabytes,
    ...; GPU metrics when pynvml finds one) logging into `run_id` every `interval_s` seconds from this process,
    under system/<node_id>/ when given; it stops by itself when the run is no longer RUNNING. `resume` continues
    the step numbers a restarted run already has."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # its INFO lines (started, stopping, no GPU found) would interleave with the epoch table
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=resume, node_id=node_id, tracking_uri=uri
    )
    monitor.start()
    return monitor
