"""Model registry: register a bundle as a new version (alias `challenger`) and promote to `champion`.

Aliases replace MLflow's deprecated stages. Promotion compares challenger and champion on the same
held-out data by FITNESS and moves `champion` only when the challenger is strictly better; both
numbers are recorded as tags on the challenger's version.
"""

from __future__ import annotations

import base64
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import instseg
from instseg.errors import InstsegError
from instseg.metrics.names import FITNESS, FITNESS_MODE
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


# what promotion records of each model besides FITNESS: mask and box mAP50-95 / mAP50 on the held-out split
PROMOTION_METRICS = ("val/segm_map", "val/segm_map50", "val/bbox_map", "val/bbox_map50")


@dataclass
class PromotionResult:
    model_name: str
    challenger_version: str
    challenger_fitness: float
    champion_version: str | None
    champion_fitness: float | None
    promoted: bool
    champion_after: str
    challenger_metrics: dict[str, float] = field(default_factory=dict)  # PROMOTION_METRICS
    champion_metrics: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
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


def register_bundle(tracking_uri: str, run_id: str, bundle_dir: Path, model_name: str, tags: dict[str, str] | None = None) -> str:
    """Log the bundle as a pyfunc model in `run_id`, register it, point `challenger` at it; returns the version."""
    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    try:
        with quiet_urls(tracking_uri), _tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
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
        with quiet_urls(tracking_uri):
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


def registered_from(tracking_uri: str, model_name: str, run_id: str, tags: dict[str, str]) -> str | None:
    """The version of `model_name` registered from `run_id` whose tags include `tags`, if any: lets a retried
    registration find what an earlier attempt already created instead of adding a second version."""
    client = MlflowClient(tracking_uri)
    try:
        versions = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except MlflowException:
        return None  # no such registered model yet
    for found in versions:
        if all(found.tags.get(key) == str(value) for key, value in tags.items()):
            return str(found.version)
    return None


def _version_for(client: MlflowClient, model_name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def model_version_run(tracking_uri: str, model_name: str, version: str) -> str:
    """The id of the run a registered model version was logged from."""
    return MlflowClient(tracking_uri).get_model_version(model_name, version).run_id


def aliases(tracking_uri: str, model_name: str) -> dict[str, str]:
    """alias -> version of a registered model."""
    return {alias: str(version) for alias, version in MlflowClient(tracking_uri).get_registered_model(model_name).aliases.items()}


def download_bundle(tracking_uri: str, uri: str, dst: Path) -> Path:
    """Fetch a registered model (models:/NAME@alias, models:/NAME/3) or a logged bundle (runs:/ID/bundle); return its bundle folder."""
    try:
        with _tracking_uri(tracking_uri):  # models:/ URIs resolve against the global registry URI
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        reason = redact(exc.message.splitlines()[0])
        raise InstsegError(f"cannot load model {uri} from {redact(tracking_uri)}: {reason}") from None
    if is_bundle(local):  # runs:/ID/bundle: a bundle logged by a training run
        return local
    if not (local / "MLmodel").is_file():
        raise InstsegError(f"{uri} is neither an instseg model bundle nor an MLflow model")
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    relative = mlmodel["flavors"]["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
    bundle = local / relative
    if not is_bundle(bundle):
        raise InstsegError(f"{uri} does not hold an instseg model bundle")
    return bundle


def promote(tracking_uri: str, model_name: str, score: Callable[[Path], dict[str, float]]) -> PromotionResult:
    """Evaluate challenger and champion with `score(bundle_dir)`; move `champion` if the challenger wins."""
    client = MlflowClient(tracking_uri)
    challenger = _version_for(client, model_name, CHALLENGER)
    if challenger is None:
        raise InstsegError(f"registered model '{model_name}' has no '{CHALLENGER}' alias: register a model first")
    champion = _version_for(client, model_name, CHAMPION)
    with tempfile.TemporaryDirectory(prefix="instseg-promote-") as tmp:
        challenger_metrics = score(download_bundle(tracking_uri, f"models:/{model_name}/{challenger.version}", Path(tmp) / "challenger"))
        champion_metrics = None
        if champion is not None:
            champion_metrics = score(download_bundle(tracking_uri, f"models:/{model_name}/{champion.version}", Path(tmp) / "champion"))
    challenger_fit = challenger_metrics[FITNESS]
    champion_fit = champion_metrics[FITNESS] if champion_metrics else None
    better = (lambda a, b: a > b) if FITNESS_MODE == "max" else (lambda a, b: a < b)
    promoted = champion is None or (champion.version != challenger.version and better(challenger_fit, champion_fit))
    tags = {
        f"promotion.challenger_{FITNESS}": challenger_fit,
        f"promotion.champion_{FITNESS}": "none" if champion_fit is None else champion_fit,
        "promotion.champion_version": "none" if champion is None else champion.version,
        "promotion.decision": "promoted" if promoted else "kept champion",
        **{f"promotion.challenger_{key.removeprefix('val/')}": v for key, v in _subset(challenger_metrics).items()},
        **{f"promotion.champion_{key.removeprefix('val/')}": v for key, v in _subset(champion_metrics).items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, challenger.version, key, str(value))
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, challenger.version)
    return PromotionResult(
        model_name=model_name,
        challenger_version=str(challenger.version),
        challenger_fitness=challenger_fit,
        champion_version=None if champion is None else str(champion.version),
        champion_fitness=champion_fit,
        promoted=promoted,
        champion_after=str(challenger.version if promoted else champion.version),
        challenger_metrics=_subset(challenger_metrics),
        champion_metrics=_subset(champion_metrics) if champion_metrics else None,
    )


def _subset(metrics: dict[str, float] | None) -> dict[str, float]:
    return {key: float(metrics[key]) for key in PROMOTION_METRICS if key in (metrics or {})}


@dataclass
class ModelVersionRow:
    """One version of a registered model as `instseg models` lists it."""

    version: str
    aliases: list[str]
    fitness: str  # the challenger fitness its promotion recorded, or "-"
    decision: str  # "promoted", "kept champion", "rolled back to", or "-"
    run_id: str


def list_versions(tracking_uri: str, model_name: str) -> list[ModelVersionRow]:
    """Every version of `model_name`, newest first, with its aliases and what its promotion recorded."""
    client = MlflowClient(tracking_uri)
    try:
        by_version = {}
        for alias, version in client.get_registered_model(model_name).aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException as exc:
        raise InstsegError(f"registered model '{model_name}' in {redact(tracking_uri)}: "
                           f"{redact(exc.message.splitlines()[0])}") from None
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


def rollback(tracking_uri: str, model_name: str) -> tuple[str, str]:
    """Point `champion` back at the version it replaced (the champion its promotion recorded); returns
    (from, to). The version rolled back from is tagged, so a second rollback goes one step further back."""
    client = MlflowClient(tracking_uri)
    current = _version_for(client, model_name, CHAMPION)
    if current is None:
        raise InstsegError(f"registered model '{model_name}' has no '{CHAMPION}' alias: nothing to roll back")
    previous = current.tags.get("promotion.champion_version", "none")
    if previous == "none" or previous == str(current.version):
        raise InstsegError(f"{model_name} v{current.version} is the first champion: no earlier one to roll back to")
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    client.set_model_version_tag(model_name, current.version, "promotion.decision", f"rolled back to {previous}")
    return str(current.version), previous
