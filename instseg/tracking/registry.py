"""Model registry: register a bundle as a new version (alias `challenger`), list versions, roll back, and the
lock that serialises moves of `champion` (the promotion gate is instseg.tracking.gate).

Aliases replace MLflow's deprecated stages.
"""

from __future__ import annotations

import base64
import os
import random
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import instseg
from instseg.errors import InstsegError
from instseg.metrics.names import FITNESS
from instseg.models.bundle import is_bundle
from instseg.redaction import redact
from instseg.tracking.pyfunc_model import BUNDLE_ARTIFACT, IMAGE_COLUMN, model_signature
from instseg.tracking.runs import quiet_urls

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")
MLFLOW_TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# what the served model imports (instseg's own code travels with it), pinned to the versions that logged it
SERVING_PACKAGES = ("torch", "torchvision", "pycocotools", "pydantic", "pyyaml", "pillow", "pandas", "numpy", "mlflow")
EXAMPLE_IMAGE_SIZE = (48, 64)  # the input example: a grey PNG this size (height, width), base64
LOCK_SUFFIX = ".promotion-lock"  # registry_lock's registered model
LOCK_SINCE_TAG, LOCK_HOLDER_TAG = "instseg.lock_since", "instseg.lock_holder"
LOCK_WAIT_S = 60.0
LOCK_STALE_S = 120.0  # a commit takes a few calls: a lock this old lost its holder


@contextmanager
def _fluent_api_store(uri: str) -> Iterator[None]:
    """mlflow.set_tracking_uri for the fluent API, undone afterwards: it also sets MLFLOW_TRACKING_URI
    in os.environ, which would silently redirect every later default lookup."""
    previous_env = os.environ.get(MLFLOW_TRACKING_URI_ENV)
    previous = mlflow.get_tracking_uri() if previous_env else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop(MLFLOW_TRACKING_URI_ENV, None)
            mlflow.set_tracking_uri(None)
        else:
            mlflow.set_tracking_uri(previous)


def register_bundle(
    uri: str, run_id: str, bundle_dir: Path, model_name: str, tags: dict[str, str] | None = None
) -> str:
    """Log the bundle as a pyfunc model in `run_id`, register it, point `challenger` at it; returns the version."""
    client = MlflowClient(uri)
    status = client.get_run(run_id).info.status
    try:
        with quiet_urls(uri), _fluent_api_store(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(PYFUNC_ENTRY),
                artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
                code_paths=[str(Path(instseg.__file__).parent)],
                pip_requirements=pinned_requirements(),
                signature=model_signature(),
                input_example=_input_example(),
                registered_model_name=model_name,
            )
    finally:
        # the fluent API reopened the run and, on a failure, would leave it FAILED: registering a model
        # never changes how its training run ended
        with quiet_urls(uri):
            client.set_terminated(run_id, status=status)
    version = str(info.registered_model_version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def pinned_requirements() -> list[str]:
    """SERVING_PACKAGES as `name==version` of this environment (a CUDA or CPU build tag left off)."""
    pinned = []
    for package in SERVING_PACKAGES:
        try:
            pinned.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pinned.append(package)
    return pinned


def _input_example() -> Any:
    import pandas as pd
    import torch
    from torchvision.io import encode_png

    image = encode_png(torch.full((3, *EXAMPLE_IMAGE_SIZE), 128, dtype=torch.uint8)).numpy().tobytes()
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(image).decode("ascii")]})


def registered_from(uri: str, model_name: str, run_id: str, tags: dict[str, str]) -> str | None:
    """The version of `model_name` registered from `run_id` whose tags include `tags`, if any: lets a retried
    registration find what an earlier attempt already created instead of adding a second version."""
    client = MlflowClient(uri)
    try:
        versions = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except MlflowException:
        return None  # no such registered model yet
    for found in versions:
        if all(found.tags.get(key) == str(value) for key, value in tags.items()):
            return str(found.version)
    return None


def version_for(client: MlflowClient, model_name: str, alias: str) -> Any | None:
    """The model version `alias` points at, or None."""
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def model_version_run(uri: str, model_name: str, version: str) -> str:
    """The id of the run a registered model version was logged from."""
    return MlflowClient(uri).get_model_version(model_name, version).run_id


def aliases(uri: str, model_name: str) -> dict[str, str]:
    """alias -> version of a registered model."""
    return {
        alias: str(version) for alias, version in MlflowClient(uri).get_registered_model(model_name).aliases.items()
    }


def download_bundle(uri: str, model_uri: str, dst: Path) -> Path:
    """Fetch a registered model (models:/NAME@alias, models:/NAME/3) or a logged bundle (runs:/ID/bundle);
    return its bundle folder."""
    try:
        with _fluent_api_store(uri):  # models:/ URIs resolve against the global registry URI
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        reason = redact(exc.message.splitlines()[0])
        raise InstsegError(f"cannot load model {model_uri} from {redact(uri)}: {reason}") from None
    if is_bundle(local):  # runs:/ID/bundle: a bundle logged by a training run
        return local
    if not (local / "MLmodel").is_file():
        raise InstsegError(f"{model_uri} is neither an instseg model bundle nor an MLflow model")
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    relative = mlmodel["flavors"]["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
    bundle = local / relative
    if not is_bundle(bundle):
        raise InstsegError(f"{model_uri} does not hold an instseg model bundle")
    return bundle


@dataclass
class ModelVersionRow:
    """One version of a registered model as `instseg models` lists it."""

    version: str
    aliases: list[str]
    fitness: str  # the challenger fitness its promotion recorded, or "-"
    decision: str  # "promoted", "kept champion", "rolled back to", or "-"
    run_id: str


def list_versions(uri: str, model_name: str) -> list[ModelVersionRow]:
    """Every version of `model_name`, newest first, with its aliases and what its promotion recorded."""
    client = MlflowClient(uri)
    try:
        by_version = {}
        for alias, version in client.get_registered_model(model_name).aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException as exc:
        raise InstsegError(
            f"registered model '{model_name}' in {redact(uri)}: {redact(exc.message.splitlines()[0])}"
        ) from None
    return [
        ModelVersionRow(
            version=str(v.version),
            aliases=sorted(by_version.get(str(v.version), [])),
            fitness=v.tags.get(f"promotion.challenger_{FITNESS}", "-"),
            decision=v.tags.get("promotion.decision", "-"),
            run_id=v.run_id or "-",
        )
        for v in sorted(versions, key=lambda v: -int(v.version))
    ]


def rollback(uri: str, model_name: str) -> tuple[str, str]:
    """Point `champion` back at the version it replaced (the champion its promotion recorded); returns
    (from, to). The version rolled back from is tagged, so a second rollback goes one step further back."""
    client = MlflowClient(uri)
    current = version_for(client, model_name, CHAMPION)
    if current is None:
        raise InstsegError(f"registered model '{model_name}' has no '{CHAMPION}' alias: nothing to roll back")
    previous = current.tags.get("promotion.champion_version", "none")
    if previous == "none" or previous == str(current.version):
        raise InstsegError(f"{model_name} v{current.version} is the first champion: no earlier one to roll back to")
    with registry_lock(client, model_name):
        if str(version_for(client, model_name, CHAMPION).version) != str(current.version):
            raise InstsegError(
                f"{model_name}: the champion changed while rolling back; see `instseg models {model_name}`"
            )
        client.set_registered_model_alias(model_name, CHAMPION, previous)
    client.set_model_version_tag(model_name, current.version, "promotion.decision", f"rolled back to {previous}")
    return str(current.version), previous


@contextmanager
def registry_lock(client: MlflowClient, model_name: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Only one process at a time moves `model_name`'s champion. MLflow has no compare-and-set on aliases, but
    creating a registered model is atomic (its name is unique), so the lock is a registered model named
    `<model_name>.promotion-lock`, held for the few calls of a commit and deleted after. One whose holder died is
    taken over after LOCK_STALE_S."""
    name = f"{model_name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                name,
                tags={LOCK_SINCE_TAG: f"{time.time():.3f}", LOCK_HOLDER_TAG: holder},
                description=f"held while {model_name}'s champion alias moves",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _take_over_if_stale(client, name)
        if time.monotonic() > deadline:
            raise InstsegError(f"{model_name}: another promotion has held {name} for over {wait_s:.0f} s; try again")
        time.sleep(random.uniform(0.05, 0.3))
    try:
        yield
    finally:
        client.delete_registered_model(name)


def _take_over_if_stale(client: MlflowClient, lock_name: str) -> None:
    try:
        since = float(client.get_registered_model(lock_name).tags.get(LOCK_SINCE_TAG, "0"))
        if time.time() - since > LOCK_STALE_S:
            client.delete_registered_model(lock_name)
    except MlflowException:
        pass  # released meanwhile
