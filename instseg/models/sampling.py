"""Training targets for a whole batch at once: box matching and balanced sampling without host syncs.

torchvision's RPN and RoI heads match and sample image by image, and its sampler and matcher read counts
and indices back from the GPU (`torch.where`, `randperm` of a length read from the device): 5 host syncs
per image of a training step, each one leaving the GPU idle until Python queues the next kernels
(bench/gpu_train.py --sections syncs). The functions here take padded [images, boxes, ...] tensors and
return masks, so the host never waits.

The rules are torchvision's (`Matcher`, `BalancedPositiveNegativeSampler`): the same matches, the same
labels and the same number of positives and negatives per image, drawn uniformly at random, though by a
different draw of the random generator (tests/unit/test_sampling.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

BELOW_LOW_THRESHOLD = -1  # torchvision's Matcher codes for unmatched boxes
BETWEEN_THRESHOLDS = -2


def pad_boxes(boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """[images, most boxes, 4] zero-padded, and a [images, most boxes] mask of the real ones."""
    padded = pad_sequence(boxes, batch_first=True)
    # made on the device: a tensor of the counts copied from the host would make the host wait for the GPU
    real = pad_sequence([b.new_ones(len(b), dtype=torch.bool) for b in boxes], batch_first=True)
    return padded, real


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of [B, M, 4] against [B, N, 4] boxes (x1, y1, x2, y2): [B, M, N], torchvision's box_iou per image."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def match_boxes(
    quality: Tensor,
    gt_valid: Tensor,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool,
) -> Tensor:
    """torchvision's Matcher on [B, G, N] IoUs with padded ground truth: [B, N] index of the matched box, or
    BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS. An image without ground truth matches nothing."""
    if quality.shape[1] == 0:
        return quality.new_full((quality.shape[0], quality.shape[2]), BELOW_LOW_THRESHOLD, dtype=torch.int64)
    quality = quality.masked_fill(~gt_valid[:, :, None], -1.0)  # padding never wins a max
    best, matches = quality.max(dim=1)
    unmatched = torch.where(best < low_threshold, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS)
    result = torch.where(best >= high_threshold, matches, unmatched)
    if allow_low_quality_matches:
        # every box that ties for the best overlap with some real ground truth keeps its best match
        best_for_gt = quality.max(dim=2, keepdim=True).values
        is_best = (quality == best_for_gt) & gt_valid[:, :, None]
        result = torch.where(is_best.any(dim=1), matches, result)
    return result


def sample_balanced(labels: Tensor, batch_size_per_image: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """torchvision's BalancedPositiveNegativeSampler for [B, N] labels (>= 1 positive, 0 negative, -1 ignored):
    [B, N] masks of the sampled positives and negatives, uniform random subsets of the same sizes."""
    positive, negative = labels >= 1, labels == 0
    most_positives = int(batch_size_per_image * positive_fraction)
    num_pos = positive.sum(1).clamp(max=most_positives)
    num_neg = negative.sum(1).clamp(max=batch_size_per_image - num_pos)
    return _random_subset(positive, num_pos, most_positives), _random_subset(negative, num_neg, batch_size_per_image)


def _random_subset(candidates: Tensor, counts: Tensor, most: int) -> Tensor:
    """counts[b] (at most `most`) of the True entries of each row of `candidates`, chosen uniformly at random:
    those with the smallest random keys."""
    most = min(most, candidates.shape[1])
    if most == 0:
        return torch.zeros_like(candidates)
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill(~candidates, 2.0)
    smallest = keys.topk(most, dim=1, largest=False).indices  # candidates first, in random order
    taken = torch.arange(most, device=counts.device) < counts[:, None]
    return torch.zeros_like(candidates).scatter_(1, smallest, taken)
