"""Region proposals with non-maximum suppression run level by level.

torchvision's RegionProposalNetwork suppresses each image's proposals in one NMS call over all FPN levels
(up to 5 x 2000 boxes in training, kept apart by the coordinate-offset trick). NMS costs grow with the square
of the boxes in one call, and the last part of torchvision's CUDA NMS runs on a single thread block: on an
H200 those calls were 45% of the GPU time of an R50-FPN v2 training step (bench/gpu_train.py, profile). The
boxes arrive grouped by level already (top-k per level), so the same suppression is one call per level on
its slice: a fifth of the work and no boxes from other levels to skip.

Boxes that torchvision removes before NMS (smaller than min_size, scoring below score_thresh) are instead given
the score -inf, which puts them after every other box, where they cannot suppress one, and dropped after
NMS; that keeps slices static and saves a host sync per filter. The kept boxes and their order (by score,
all levels together) are torchvision's (tests/unit/test_rpn.py).

In training, anchors are matched and sampled for the whole batch at once (instseg.models.sampling) and the
losses are sums over masks: the host reads nothing back from the device, where torchvision waits three times
per image. Proposal filtering reads back one count per image, all in one sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from instseg.models.sampling import BETWEEN_THRESHOLDS, match_boxes, pad_boxes, pairwise_iou, sample_balanced

# at most this many IoUs (images x ground-truth boxes x anchors) at once: about 0.5 GB of temporaries
IOU_ELEMENTS_PER_CHUNK = 1 << 24


class LevelNmsRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with filter_proposals suppressing one FPN level per NMS call, and training targets
    matched and sampled for the whole batch without host syncs."""

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        num_images = len(proposals)
        objectness = objectness.detach().reshape(num_images, -1)  # no gradient through the ranking
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # level by level, as many as this
        level_sizes = [min(self.pre_nms_top_n(), count) for count in num_anchors_per_level]
        rows = torch.arange(num_images, device=proposals.device)[:, None]
        scores_per_image = torch.sigmoid(objectness[rows, top_n_idx])
        proposals = proposals[rows, top_n_idx]
        kept, valid_counts = [], []
        for boxes, scores, image_shape in zip(proposals, scores_per_image, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            valid = (widths >= self.min_size) & (heights >= self.min_size) & (scores >= self.score_thresh)
            ranked = scores.masked_fill(~valid, float("-inf"))
            keep, start = [], 0
            for size in level_sizes:
                keep.append(
                    box_ops.nms(boxes[start : start + size], ranked[start : start + size], self.nms_thresh) + start
                )
                start += size
            keep = torch.cat(keep)
            keep = keep[ranked[keep].sort(descending=True)[1]]  # the valid boxes first
            kept.append((boxes, scores, keep))
            valid_counts.append(valid[keep].sum())
        counts = torch.stack(valid_counts).tolist()  # one host sync for the batch
        final_boxes, final_scores = [], []
        for (boxes, scores, keep), count in zip(kept, counts):
            keep = keep[: min(count, self.post_nms_top_n())]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: labels 1 (matched), 0 (background), -1 (ignored) and the matched ground-truth boxes."""
        gt_boxes, gt_valid = pad_boxes([target["boxes"] for target in targets])
        anchors = torch.stack(anchors)
        matcher = self.proposal_matcher
        step = max(1, IOU_ELEMENTS_PER_CHUNK // max(1, gt_boxes.shape[1] * anchors.shape[1]))
        matches = torch.cat(
            [
                match_boxes(
                    pairwise_iou(gt_boxes[start : start + step], anchors[start : start + step]),
                    gt_valid[start : start + step],
                    matcher.high_threshold,
                    matcher.low_threshold,
                    matcher.allow_low_quality_matches,
                )
                for start in range(0, len(anchors), step)
            ]
        )
        labels = torch.where(matches >= 0, 1.0, torch.where(matches == BETWEEN_THRESHOLDS, -1.0, 0.0))
        if gt_boxes.shape[1] == 0:
            matched_boxes = torch.zeros_like(anchors)
        else:
            matched_boxes = gt_boxes.gather(1, matches.clamp(min=0)[..., None].expand(-1, -1, 4))
        return list(labels.unbind(0)), list(matched_boxes.unbind(0))

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's objectness and box losses over the sampled anchors, as sums over masks."""
        labels = torch.stack(labels)
        sampler = self.fg_bg_sampler
        positive, negative = sample_balanced(labels, sampler.batch_size_per_image, sampler.positive_fraction)
        sampled = (positive | negative).flatten()
        count = sampled.sum()
        box_loss = F.smooth_l1_loss(pred_bbox_deltas, torch.cat(regression_targets), beta=1 / 9, reduction="none")
        box_loss = torch.where(positive.reshape(-1, 1), box_loss, 0.0).sum() / count
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten(), labels.flatten(), reduction="none")
        objectness_loss = torch.where(sampled, objectness_loss, 0.0).sum() / count
        return objectness_loss, box_loss


def use_level_nms(model: nn.Module) -> nn.Module:
    """Switch a torchvision detection model's RPN to LevelNmsRegionProposalNetwork (no state of its own)."""
    if type(model.rpn) is RegionProposalNetwork:
        model.rpn.__class__ = LevelNmsRegionProposalNetwork
    return model
