"""instseg: Mask R-CNN instance segmentation, trained and tuned on Ray, tracked in MLflow.

The core package is pure PyTorch/torchvision: nothing here imports ray or prefect, and nothing
happens at import time.
"""

__version__ = "0.1.0"
