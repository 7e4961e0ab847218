"""Training learns: the tiny model overfits 8 synthetic images through the real dataset class (flips on),
loader, optimizer, LR schedule and train_one_epoch; and the same run with its targets wired wrong does not,
so a bug in labels, flips or masks fails here. The Ray Train (2-worker DDP) version is in
tests/integration/test_learning_ray.py."""

import pytest
import torch

from instseg.config import Config
from instseg.data.coco import CocoInstanceDataset
from instseg.evaluation import evaluate_on_split
from instseg.models import build_model
from tests.helpers import OVERFIT_BAR, overfit_config, train_in_process


class ShiftedLabels(CocoInstanceDataset):
    """Mutation: every instance trained as the next class (circle as rectangle, ...)."""

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        target["labels"] = target["labels"] % (self.label_map.num_classes - 1) + 1
        return image, target


class MasksFlippedNotBoxes(CocoInstanceDataset):
    """Mutation: masks mirrored while boxes stay, as a flip applied to one of the two would do."""

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        target["masks"] = target["masks"].flip(-1)
        return image, target


def _evaluate(model: torch.nn.Module, cfg: Config) -> dict[str, float]:
    """COCO metrics on the val split: the same 8 images, unflipped."""
    with torch.inference_mode():
        return evaluate_on_split(
            model, CocoInstanceDataset(cfg.data.root, "val").label_map, cfg.data, "val", cfg.metrics.fitness_weights
        )


def test_tiny_model_overfits_eight_images(overfit_root, overfit_weights, tmp_path):
    cfg = overfit_config(overfit_root, tmp_path)
    assert cfg.data.hflip_prob == 0.5, "the flips must be part of what is tested"
    model = build_model(cfg.model, 4)
    model.load_state_dict(torch.load(overfit_weights, weights_only=True))  # trained by train_in_process(cfg)
    metrics = _evaluate(model, cfg)
    assert metrics["val/segm_map50"] >= OVERFIT_BAR, metrics
    assert metrics["val/bbox_map50"] >= OVERFIT_BAR, metrics


@pytest.mark.parametrize(
    "mutation", [ShiftedLabels, MasksFlippedNotBoxes], ids=["labels-shifted", "masks-flipped-not-boxes"]
)
def test_overfit_test_fails_when_targets_are_wired_wrong(overfit_root, tmp_path, mutation):
    cfg = overfit_config(overfit_root, tmp_path)
    metrics = _evaluate(train_in_process(cfg, mutation), cfg)
    assert metrics["val/segm_map50"] < OVERFIT_BAR / 2, metrics
    if mutation is MasksFlippedNotBoxes:  # the boxes are still right, and still learned: only the masks broke
        assert metrics["val/bbox_map50"] >= OVERFIT_BAR, metrics
