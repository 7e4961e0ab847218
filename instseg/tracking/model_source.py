"""Where a command's `--model` comes from: the registry (models:/NAME@alias), a run (runs:/ID/bundle), or a
local bundle folder or checkpoint. MLflow URIs are resolved here, so inference (instseg.predict) stays local."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from instseg.tracking.registry import download_bundle

MLFLOW_SCHEMES = ("models:/", "runs:/")


@contextmanager
def local_model(model: str, uri: str) -> Iterator[str]:
    """`model` as a local path for the time of the block: a registered or logged bundle is downloaded from the
    tracking store `uri` to a temporary folder (removed after), anything else is passed through for
    instseg.predict.load_model to check."""
    if not model.startswith(MLFLOW_SCHEMES):
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="instseg-model-") as tmp:
        yield str(download_bundle(uri, model, Path(tmp)))
