"""RoIHeads with an optional soft-Dice term on the mask head (`model.mask_dice_weight`).

The seam: BatchedRoIHeads' `mask_losses` gets each positive proposal's mask logits for its class and
torchvision's 28x28 target (project_masks_on_boxes); the Dice term is added to the BCE as
`loss_mask_dice` (already multiplied by its weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models.detection.roi_heads import RoIHeads

from instseg.models.roi_heads import BatchedRoIHeads

DICE_LOSS = "loss_mask_dice"


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over instances of 1 - (2 |P ∩ T| + eps) / (|P| + |T| + eps), P = sigmoid(logits) (soft)."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    inter = (probs * targets).sum(1)
    return (1 - (2 * inter + eps) / (probs.sum(1) + targets.sum(1) + eps)).mean()


class DiceRoIHeads(BatchedRoIHeads):
    def __init__(self, *args: Any, mask_dice_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_dice_weight = mask_dice_weight

    @classmethod
    def from_heads(cls, heads: RoIHeads, mask_dice_weight: float) -> "DiceRoIHeads":
        """The same modules and settings as `heads`, with the Dice term."""
        return cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.proposal_matcher.high_threshold,
            heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image,
            heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool,
            mask_head=heads.mask_head,
            mask_predictor=heads.mask_predictor,
            mask_dice_weight=mask_dice_weight,
        )

    def mask_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = super().mask_losses(logits, targets)
        if self.mask_dice_weight > 0:
            dice = soft_dice_loss(logits, targets) if targets.numel() else logits.sum() * 0
            losses[DICE_LOSS] = self.mask_dice_weight * dice
        return losses
