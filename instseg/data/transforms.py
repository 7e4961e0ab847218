"""Train-time augmentation applied to image, boxes and masks together.

Resizing is left to the model's GeneralizedRCNNTransform (model.min_size / max_size), which
also maps predictions back to the input resolution, so evaluation needs no rescaling.
"""

from __future__ import annotations

import torch

from instseg.data.coco import Target


class RandomHorizontalFlip:
    def __init__(self, prob: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.prob = prob
        self.generator = generator

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if self.prob <= 0 or torch.rand(1, generator=self.generator).item() >= self.prob:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        return image, {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def train_transforms(hflip_prob: float) -> RandomHorizontalFlip | None:
    return RandomHorizontalFlip(hflip_prob) if hflip_prob > 0 else None
