"""Models-from-code entry that MLflow executes when it loads a registered model (not imported by instseg)."""

from mlflow.models import set_model

from instseg.tracking.pyfunc_model import InstanceSegmentationModel

set_model(InstanceSegmentationModel())
