"""RoIHeads with an optional soft-Dice term on the mask head (`model.mask_dice_weight`).

The seam: torchvision's RoIHeads is subclassed, not patched. `select_training_samples` is extended to
keep the sampled proposals, a forward hook on the mask predictor keeps the mask logits, and after
torchvision's own forward the Dice loss is computed on the same positive proposals and the same
28x28 targets (torchvision's project_masks_on_boxes) as torchvision's mask BCE, and returned as
`loss_mask_dice` (already multiplied by its weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes

DICE_LOSS = "loss_mask_dice"


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over instances of 1 - (2 |P ∩ T| + eps) / (|P| + |T| + eps), P = sigmoid(logits) (soft)."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    inter = (probs * targets).sum(1)
    return (1 - (2 * inter + eps) / (probs.sum(1) + targets.sum(1) + eps)).mean()


class DiceRoIHeads(RoIHeads):
    def __init__(self, *args: Any, mask_dice_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_dice_weight = mask_dice_weight
        self._sampled: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._mask_logits: torch.Tensor | None = None
        self.mask_predictor.register_forward_hook(self._keep_logits)

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

    def _keep_logits(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._mask_logits = output if self.training else None

    def select_training_samples(self, proposals, targets):  # noqa: ANN001, ANN201 (torchvision's signature)
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self._sampled = (proposals, matched_idxs, labels)
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: ANN001, ANN201
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training and self.mask_dice_weight > 0 and self._sampled is not None and self._mask_logits is not None:
            losses[DICE_LOSS] = self.mask_dice_weight * self._dice(targets)
        self._sampled, self._mask_logits = None, None
        return result, losses

    def _dice(self, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        proposals, matched_idxs, labels = self._sampled
        logits = self._mask_logits
        size = logits.shape[-1]
        mask_targets, class_logits = [], []
        start = 0
        for image_proposals, image_matched, image_labels, target in zip(proposals, matched_idxs, labels, targets):
            positive = torch.where(image_labels > 0)[0]
            count = len(positive)
            if count:
                mask_targets.append(project_masks_on_boxes(target["masks"], image_proposals[positive], image_matched[positive], size))
                image_logits = logits[start : start + count]
                class_logits.append(image_logits[torch.arange(count, device=logits.device), image_labels[positive]])
            start += count
        if not mask_targets:
            return logits.sum() * 0
        return soft_dice_loss(torch.cat(class_logits), torch.cat(mask_targets))
