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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops


class LevelNmsRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with filter_proposals suppressing one FPN level per NMS call."""

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
        final_boxes, final_scores = [], []
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
            keep = keep[ranked[keep].sort(descending=True)[1]]
            keep = keep[valid[keep]][: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


def use_level_nms(model: nn.Module) -> nn.Module:
    """Switch a torchvision detection model's RPN to LevelNmsRegionProposalNetwork (no state of its own)."""
    if type(model.rpn) is RegionProposalNetwork:
        model.rpn.__class__ = LevelNmsRegionProposalNetwork
    return model
