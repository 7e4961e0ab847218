"""Batched mask pasting (instseg.models.paste) against torchvision's one-at-a-time paste."""

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from instseg.config import ModelConfig
from instseg.models import build_model
from instseg.models.paste import BatchedPasteTransform, paste_masks


def random_detections(count: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probabilities with structure (smoothed noise) in boxes of every kind: large, 1-3 px, and boxes
    that cross the image's edges (a model's boxes are clipped to the image, but pasting widens them)."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(count, 1, 7, 7, generator=generator)
    masks = torch.nn.functional.interpolate(masks, size=(28, 28), mode="bilinear", align_corners=False)
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width - 4.0, height - 4.0]) - 1
    wh = torch.rand(count, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6]) + 0.2
    wh[: count // 5] = torch.rand(count // 5, 2, generator=generator) * 3  # tiny boxes
    return masks, torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("height,width", [(120, 160), (97, 61)])
def test_paste_matches_torchvision_per_mask(height, width):
    masks, boxes = random_detections(60, height, width)
    ours = paste_masks(masks, boxes, (height, width))
    reference = paste_masks_in_image(masks, boxes, (height, width))
    assert ours.shape == reference.shape == (60, 1, height, width)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    for a, b in zip(ours[:, 0] > 0.5, reference[:, 0] > 0.5):
        union = (a | b).sum()
        if union:
            assert (a & b).sum() / union >= 0.99


def test_paste_in_chunks_and_of_nothing(monkeypatch):
    masks, boxes = random_detections(9, 50, 40, seed=1)
    whole = paste_masks(masks, boxes, (50, 40))
    monkeypatch.setattr("instseg.models.paste.CHUNK_ELEMENTS", 50 * 40 * 2)  # two masks per product
    assert torch.equal(paste_masks(masks, boxes, (50, 40)), whole)
    assert paste_masks(masks[:0], boxes[:0], (50, 40)).shape == (0, 1, 50, 40)


def test_models_paste_in_one_go_with_the_same_detections():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160, box_score_thresh=0.0), num_classes=3
    ).eval()
    assert type(model.transform) is BatchedPasteTransform
    images = [torch.rand(3, 100, 140), torch.rand(3, 130, 90)]
    with torch.no_grad():
        ours = model(images)
        model.transform.__class__ = BatchedPasteTransform.__bases__[0]  # torchvision's own transform
        reference = model(images)
    for a, b in zip(ours, reference):
        assert len(a["masks"]) > 0
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["masks"], b["masks"], atol=1e-5)
