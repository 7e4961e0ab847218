"""Mask pasting for Mask R-CNN inference, all masks of an image at once.

torchvision's GeneralizedRCNNTransform.postprocess pastes each 28x28 mask into the image on its own (one
interpolate and one copy per detection: ~100 small kernels and host round trips per image), which makes
inference slower than training on a GPU. Bilinear resizing is separable, so the same paste is two batched
matrix products per image: rows = Ry @ mask @ Rx^T, where Rx and Ry hold each output pixel's two bilinear
weights (zero outside the detection's box). The weights follow F.interpolate(bilinear, align_corners=False)
exactly; only the summation order differs, so the pasted masks equal torchvision's to float rounding
(tests/unit/test_paste.py: IoU >= 0.99 per mask after thresholding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import expand_boxes
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

PADDING = 1  # torchvision pads each mask by one pixel before pasting (a zero border for the interpolation)
CHUNK_ELEMENTS = 2**25  # pasted pixels per matrix product (128 MB of float32): bounds the temporary memory


def _weights(start: Tensor, length: Tensor, source: int, size: int) -> Tensor:
    """[N, size, source] bilinear weights: output pixel p of detection n samples its `source`-pixel padded
    mask at (p - start + 0.5) * source / length - 0.5 (clamped at 0, as F.interpolate does), for p inside
    [start, start + length); rows outside are zero."""
    positions = torch.arange(size, device=start.device, dtype=torch.float32)
    local = positions[None, :] - start[:, None].float()
    inside = (local >= 0) & (local < length[:, None].float())
    scale = source / length[:, None].float()
    coordinate = ((local + 0.5) * scale - 0.5).clamp(min=0)
    low = coordinate.floor().clamp(max=source - 1)
    fraction = coordinate - low
    low = low.long()
    high = (low + 1).clamp(max=source - 1)
    weights = torch.zeros(len(start), size, source, device=start.device, dtype=torch.float32)
    weights.scatter_add_(2, low[..., None], ((1 - fraction) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (fraction * inside)[..., None])
    return weights


def paste_masks(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int]) -> Tensor:
    """[N, 1, M, M] mask probabilities in [N, 4] xyxy image boxes -> [N, 1, H, W] float32 masks, as
    torchvision.models.detection.roi_heads.paste_masks_in_image computes them."""
    height, width = image_shape
    count = len(masks)
    out = torch.zeros(count, 1, height, width, device=masks.device, dtype=torch.float32)
    if count == 0:
        return out
    size = masks.shape[-1]
    source = size + 2 * PADDING
    with torch.autocast(masks.device.type, enabled=False):
        padded = F.pad(masks[:, 0].float(), (PADDING,) * 4)
        corners = expand_boxes(boxes.float(), source / size).to(torch.int64)
        x0, y0 = corners[:, 0], corners[:, 1]
        box_width = (corners[:, 2] - x0 + 1).clamp(min=1)
        box_height = (corners[:, 3] - y0 + 1).clamp(min=1)
        chunk = max(1, CHUNK_ELEMENTS // (height * width))
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            rows = _weights(y0[part], box_height[part], source, height)
            columns = _weights(x0[part], box_width[part], source, width)
            out[part, 0] = rows @ padded[part] @ columns.transpose(1, 2)
    return out


class BatchedPasteTransform(GeneralizedRCNNTransform):
    """torchvision's transform with paste_masks in place of its one-mask-at-a-time paste."""

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for prediction, shape, original in zip(result, image_shapes, original_image_sizes):
            prediction["boxes"] = resize_boxes(prediction["boxes"], shape, original)
            if "masks" in prediction:
                prediction["masks"] = paste_masks(prediction["masks"], prediction["boxes"], original)
            if "keypoints" in prediction:
                raise NotImplementedError("BatchedPasteTransform is for Mask R-CNN (no keypoints)")
        return result


def use_batched_paste(model: nn.Module) -> nn.Module:
    """Switch a torchvision detection model's transform to BatchedPasteTransform (it has no state of its
    own, so weights, state dicts and every other behaviour stay as they were)."""
    if type(model.transform) is GeneralizedRCNNTransform:
        model.transform.__class__ = BatchedPasteTransform
    return model
