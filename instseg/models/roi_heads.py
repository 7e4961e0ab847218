"""RoI heads whose training step matches and samples the whole batch at once.

torchvision's RoIHeads matches proposals to ground truth, samples them and picks the mask branch's positives
image by image, and reads counts and indices back from the GPU in each of those steps (4 host syncs per image,
bench/gpu_train.py --sections syncs). BatchedRoIHeads does them on padded tensors (instseg.models.sampling)
and reads back one thing per step: how many proposals of each image were sampled and how many of those are
positive. The sampled proposals of an image come positives first, so the mask branch takes a prefix.

The sampled sets follow torchvision's rules and sizes, and the losses are torchvision's formulas; they agree
to float rounding when the sampling takes every candidate (tests/unit/test_sampling.py). Inference is
torchvision's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes

from instseg.models.sampling import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    match_boxes,
    pad_boxes,
    pairwise_iou,
    sample_balanced,
)


@dataclass
class SampledProposals:
    """Per image: the sampled proposals (positives first), their matched ground-truth index, class label
    (0 background) and box-regression target; and how many of them are positive."""

    proposals: list[Tensor]
    matched_idxs: list[Tensor]
    labels: list[Tensor]
    regression_targets: list[Tensor]
    positives: list[int]


def box_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor) -> dict:
    """torchvision's fastrcnn_loss with the positives as a mask instead of indices read back from the GPU."""
    rows = torch.arange(len(labels), device=labels.device)
    per_class = box_regression.reshape(len(labels), -1, 4)[rows, labels]
    box_loss = F.smooth_l1_loss(per_class, regression_targets, beta=1 / 9, reduction="none")
    box_loss = torch.where((labels > 0)[:, None], box_loss, 0.0).sum() / labels.numel()
    return {"loss_classifier": F.cross_entropy(class_logits, labels), "loss_box_reg": box_loss}


class BatchedRoIHeads(RoIHeads):
    """torchvision's RoIHeads with training targets built for the whole batch (one host sync per step)."""

    def sample_proposals(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> SampledProposals:
        """torchvision's select_training_samples: the ground truth joins the proposals, each is matched and
        labelled, and a balanced random sample is kept per image."""
        dtype = proposals[0].dtype
        gt_boxes = [target["boxes"].to(dtype) for target in targets]
        candidates, valid = pad_boxes(self.add_gt_proposals(proposals, gt_boxes))
        gt, gt_valid = pad_boxes(gt_boxes)
        matcher, sampler = self.proposal_matcher, self.fg_bg_sampler
        matches = match_boxes(
            pairwise_iou(gt, candidates),
            gt_valid,
            matcher.high_threshold,
            matcher.low_threshold,
            matcher.allow_low_quality_matches,
        )
        matched = matches.clamp(min=0)
        if gt.shape[1]:
            labels = pad_sequence([target["labels"] for target in targets], batch_first=True).gather(1, matched)
        else:
            labels = torch.zeros_like(matched)
        labels = torch.where(matches == BELOW_LOW_THRESHOLD, 0, labels)
        labels = torch.where((matches == BETWEEN_THRESHOLDS) | ~valid, -1, labels)  # ignored, or padding
        positive, negative = sample_balanced(labels, sampler.batch_size_per_image, sampler.positive_fraction)
        width = candidates.shape[1]
        index = torch.arange(width, device=candidates.device)
        rank = torch.where(positive, index, torch.where(negative, index + width, index + 2 * width))
        slots = rank.argsort(dim=1)[:, : min(sampler.batch_size_per_image, width)]  # positives, negatives, rest
        counts = torch.stack([positive.sum(1), (positive | negative).sum(1)]).tolist()  # the one host sync
        boxes = candidates.gather(1, slots[..., None].expand(-1, -1, 4))
        matched, labels = matched.gather(1, slots), labels.gather(1, slots)
        if gt.shape[1]:
            gt_of_slot = gt.gather(1, matched[..., None].expand(-1, -1, 4))
        else:
            gt_of_slot = torch.zeros_like(boxes)
        regression = self.box_coder.encode_single(gt_of_slot.reshape(-1, 4), boxes.reshape(-1, 4))
        regression = regression.reshape(boxes.shape)
        taken = counts[1]
        return SampledProposals(
            proposals=[image[:n] for image, n in zip(boxes, taken)],
            matched_idxs=[image[:n] for image, n in zip(matched, taken)],
            labels=[image[:n] for image, n in zip(labels, taken)],
            regression_targets=[image[:n] for image, n in zip(regression, taken)],
            positives=counts[0],
        )

    def select_training_samples(self, proposals, targets):  # noqa: ANN001, ANN201 (torchvision's signature)
        sample = self.sample_proposals(proposals, targets)
        return sample.proposals, sample.matched_idxs, sample.labels, sample.regression_targets

    def mask_losses(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Losses of the mask head from each positive's logits for its class and its 28x28 target."""
        if targets.numel() == 0:
            return {"loss_mask": logits.sum() * 0}
        return {"loss_mask": F.binary_cross_entropy_with_logits(logits, targets)}

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: ANN001, ANN201 (torchvision's)
        if not self.training or self.keypoint_predictor is not None:
            return super().forward(features, proposals, image_shapes, targets)
        self.check_targets(targets)
        for target in targets:
            if not target["boxes"].is_floating_point() or target["labels"].dtype != torch.int64:
                raise TypeError("target boxes must be floating point and labels int64")
        sample = self.sample_proposals(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, sample.proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        losses = box_losses(
            class_logits, box_regression, torch.cat(sample.labels), torch.cat(sample.regression_targets)
        )
        if self.has_mask():
            losses.update(self._mask_branch(features, sample, image_shapes, targets))
        return [], losses

    def _mask_branch(
        self,
        features: dict[str, Tensor],
        sample: SampledProposals,
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        boxes = [image[:n] for image, n in zip(sample.proposals, sample.positives)]
        matched = [image[:n] for image, n in zip(sample.matched_idxs, sample.positives)]
        labels = torch.cat([image[:n] for image, n in zip(sample.labels, sample.positives)])
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        size = logits.shape[-1]
        mask_targets = torch.cat(
            [project_masks_on_boxes(t["masks"], b, m, size) for t, b, m in zip(targets, boxes, matched)]
        )
        return self.mask_losses(logits[torch.arange(len(labels), device=labels.device), labels], mask_targets)


def use_batched_roi_heads(model: nn.Module) -> nn.Module:
    """Switch a torchvision detection model's RoIHeads to BatchedRoIHeads (no state of its own)."""
    if type(model.roi_heads) is RoIHeads:
        model.roi_heads.__class__ = BatchedRoIHeads
    return model
