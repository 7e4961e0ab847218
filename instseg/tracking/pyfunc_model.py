"""The MLflow pyfunc that serves a registered instseg model.

Logged as models-from-code (pyfunc_entry.py) with the bundle folder as an artifact, so loading a
registered model never unpickles Python objects: weights load with weights_only=True.
Input: a DataFrame with a `path` column (image files) and optionally `image_id`.
Output: a DataFrame of COCO results (image_id, category_id, bbox, score, segmentation as RLE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

BUNDLE_ARTIFACT = "bundle"


class InstanceSegmentationModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from instseg.models.bundle import load_bundle

        self.model, self.label_map, self.meta = load_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]))

    def predict(self, context, model_input, params=None):  # untyped: MLflow derives a schema from hints
        import pandas as pd

        from instseg.predict import predict_paths

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"path": list(model_input)})
        ids = frame["image_id"].tolist() if "image_id" in frame else None
        results = predict_paths(self.model, self.label_map, frame["path"].tolist(), image_ids=ids)
        return pd.DataFrame(results)
