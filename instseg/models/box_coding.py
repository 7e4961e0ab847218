"""Box decoding in float32 under mixed precision.

Under bf16 autocast, torchvision's BoxCoder.decode casts the anchors or proposals to the dtype of the predicted
offsets, so proposals and detections come out in bf16: 8 bits of mantissa, coordinates 2-4 px apart at 500-1000
px. Training then samples RoIs from coarse proposals, whose width can round to 0 and make the box-regression
target infinite (loss_box_reg turned NaN within one epoch on coco128-seg at 128 px on a CPU), and validation
scores coarse boxes. Decoding in float32, as an fp32 run does, keeps the autocast speed of the convolutions and
matrix products; an fp32 run's math is unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder


class Float32BoxCoder(BoxCoder):
    """torchvision's BoxCoder, decoding from float32 offsets (its weights and clipping unchanged)."""

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        return super().decode(rel_codes.float(), boxes)


def use_float32_box_decoding(model: nn.Module) -> nn.Module:
    """Switch the RPN's and the RoI heads' box coders of a torchvision detection model to Float32BoxCoder."""
    for owner in (model.rpn, model.roi_heads):
        if type(owner.box_coder) is BoxCoder:
            owner.box_coder.__class__ = Float32BoxCoder
    return model
