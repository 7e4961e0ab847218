"""The MLflow pyfunc that serves a registered instseg model (`mlflow models serve`, `mlflow.pyfunc.load_model`).

Logged as models-from-code (pyfunc_entry.py) with the bundle folder as an artifact, so loading a
registered model never unpickles Python objects: weights load with weights_only=True.

Input: a DataFrame (over HTTP: {"dataframe_records": [...]}) with a column `image`, each an encoded image
(JPEG, PNG, ...) in base64, and optionally `image_id`; the images travel with the request, the server reads no
file path. Parameter `conf` (default 0) drops detections scoring below it.
Output: one row per detection, as COCO results: image_id, category_id, category (its name), bbox (x, y, w, h),
score, segmentation (compressed RLE: {"size": [h, w], "counts": str}).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

BUNDLE_ARTIFACT = "bundle"
IMAGE_COLUMN = "image"
IMAGE_ID_COLUMN = "image_id"
RESULT_COLUMNS = ("image_id", "category_id", "category", "bbox", "score", "segmentation")
BATCH_SIZE = 4  # images per forward pass


def model_signature() -> Any:
    """What the served model takes and returns, recorded with every registered version."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    inputs = Schema([ColSpec("string", IMAGE_COLUMN), ColSpec("long", IMAGE_ID_COLUMN, required=False)])
    rle = Object([Property("size", Array("long")), Property("counts", "string")])
    outputs = Schema(
        [
            ColSpec("long", "image_id"),
            ColSpec("long", "category_id"),
            ColSpec("string", "category"),
            ColSpec(Array("double"), "bbox"),
            ColSpec("double", "score"),
            ColSpec(rle, "segmentation"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("conf", "double", 0.0)]))


def encode_image_file(path: str | Path) -> str:
    """An image file as the base64 text the `image` column takes."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


class InstanceSegmentationModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from instseg.models.bundle import load_bundle
        from instseg.predict import resolve_device

        self.model, self.label_map, self.meta = load_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]))
        self.device = resolve_device("auto")
        self.model.eval().to(self.device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from instseg.errors import InstsegError
        from instseg.metrics.coco_eval import to_coco_results
        from instseg.predict import decode_image_bytes, detect

        if IMAGE_COLUMN not in model_input:
            raise _bad_input(f"the input needs a column '{IMAGE_COLUMN}': each image's bytes in base64")
        texts = list(model_input[IMAGE_COLUMN])
        ids = list(model_input[IMAGE_ID_COLUMN]) if IMAGE_ID_COLUMN in model_input else range(1, len(texts) + 1)
        conf = float((params or {}).get("conf", 0.0))
        rows: list[dict[str, Any]] = []
        for start in range(0, len(texts), BATCH_SIZE):
            try:
                images = [
                    decode_image_bytes(_from_base64(text, start + offset), f"row {start + offset}").to(self.device)
                    for offset, text in enumerate(texts[start : start + BATCH_SIZE])
                ]
            except InstsegError as exc:
                raise _bad_input(str(exc)) from None
            for image_id, output in zip(ids[start : start + BATCH_SIZE], detect(self.model, images, conf)):
                for entry in to_coco_results(int(image_id), output, self.label_map):
                    name = self.label_map.names[self.label_map.label(entry["category_id"]) - 1]
                    rows.append({**entry, "category": name})
        return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def _bad_input(message: str) -> Exception:
    """The scoring server answers an MlflowException with HTTP 400 and this message (any other error: a generic one)."""
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _from_base64(text: Any, row: int) -> bytes:
    from instseg.errors import InstsegError

    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise InstsegError(f"row {row}: '{IMAGE_COLUMN}' is not base64 (the image file's bytes, encoded)") from None
