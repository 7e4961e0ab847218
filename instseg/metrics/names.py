"""The one metric namespace: `train/...`, `val/...` and the single ranking metric `fitness`.

FITNESS ranks checkpoints (Ray Train CheckpointConfig), trials (Ray Tune) and registered models
(promotion); FITNESS_MODE says which direction is better. Nothing else may rank anything.
"""

FITNESS = "fitness"
FITNESS_MODE = "max"
EPOCH = "epoch"
EARLY_STOPPED = "train/early_stopped"  # 1.0 on the epoch after which patience ran out

TRAIN_LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
TRAIN_LOSS = "train/loss"
WORKER_THROUGHPUT = "train/worker_images_per_s"  # training images per second per worker (mean over workers)
EPOCH_TIME = "train/epoch_time_s"  # seconds the epoch took: training, validation and its plots
LEARNING_RATE = "train/lr"  # at the end of the epoch (first parameter group)
# seconds from the worker's loop entry to its first epoch (data, model, logging setup), per (re)start; the point's
# MLflow timestamp is when that setup ended (bench/tune_efficiency.py splits a trial's fixed overhead with it)
SETUP_TIME = "train/setup_s"

# pycocotools COCOeval.stats order, under the names users know from torchmetrics / Ultralytics
COCO_STAT_NAMES = (
    "map",
    "map50",
    "map75",
    "map_small",
    "map_medium",
    "map_large",
    "mar1",
    "mar10",
    "mar100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def train_key(loss_name: str) -> str:
    return f"train/{loss_name}"


def val_key(iou_type: str, stat: str) -> str:
    return f"val/{iou_type}_{stat}"
