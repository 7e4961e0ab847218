"""The MLflow pyfunc that serves a registered instseg model.

Logged as models-from-code (pyfunc_entry.py) with the bundle folder as an artifact, so loading a
registered model never unpickles Python objects: weights load with weights_only=True.
Input: a list of image paths.
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

    def predict(self, context, model_input: list[str], params=None):  # MLflow reads the model_input hint
        """model_input: image paths (a numeric file name is taken as the COCO image id)."""
        import pandas as pd

        from instseg.predict import predict_paths

        return pd.DataFrame(predict_paths(self.model, self.label_map, list(model_input)))
