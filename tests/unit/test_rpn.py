"""Level-by-level NMS in the RPN (instseg.models.rpn) against torchvision's filter_proposals."""

import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork

from instseg.config import ModelConfig
from instseg.models import build_model
from instseg.models.rpn import LevelNmsRegionProposalNetwork


def proposals_and_scores(images: int, levels: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered boxes (so NMS suppresses many), some beyond the image, some thinner than min_size."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(levels)
    centres = torch.rand(images, total // 8 + 1, 2, generator=generator) * 200
    picked = centres[:, torch.randint(0, centres.shape[1], (total,), generator=generator)]
    xy = picked + torch.randn(images, total, 2, generator=generator) * 4
    wh = torch.rand(images, total, 2, generator=generator) * 60 + 1
    wh[:, ::37, 0] = 1e-4  # thinner than RPN.min_size (1e-3): removed before NMS by torchvision
    boxes = torch.cat([xy - 10, xy - 10 + wh], 2)
    return boxes, torch.randn(images * total, 1, generator=generator)


@pytest.mark.parametrize("training", [True, False])
def test_level_nms_keeps_torchvisions_proposals_in_its_order(training):
    model = build_model(ModelConfig(arch="tiny", weights="none"), num_classes=3)
    rpn = model.rpn.train(training)
    assert type(rpn) is LevelNmsRegionProposalNetwork
    levels = [900, 700, 300, 80]  # one level above pre_nms_top_n (600 / 300 in the tiny preset)
    boxes, scores = proposals_and_scores(3, levels)
    shapes = [(180, 200), (200, 150), (190, 190)]
    ours = rpn.filter_proposals(boxes, scores, shapes, levels)
    rpn.__class__ = RegionProposalNetwork
    reference = rpn.filter_proposals(boxes, scores, shapes, levels)
    for our_boxes, their_boxes in zip(ours[0], reference[0]):
        assert len(their_boxes) > 50
        assert torch.equal(our_boxes, their_boxes)
    for our_scores, their_scores in zip(ours[1], reference[1]):
        assert torch.equal(our_scores, their_scores)
