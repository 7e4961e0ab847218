"""Batched training targets (instseg.models.sampling, rpn, roi_heads) against torchvision's per-image ones."""

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from instseg.config import ModelConfig
from instseg.models import build_model
from instseg.models.dice_heads import DICE_LOSS
from instseg.models.roi_heads import BatchedRoIHeads
from instseg.models.rpn import LevelNmsRegionProposalNetwork
from instseg.models.sampling import match_boxes, pad_boxes, pairwise_iou, sample_balanced

TAKE_ALL = 10**7  # a sampler batch this large takes every candidate: no random draw left to differ


def random_boxes(count: int, generator: torch.Generator, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * size
    return torch.cat([xy, xy + torch.rand(count, 2, generator=generator) * 40 + 1], 1)


@pytest.mark.parametrize("allow_low_quality", [True, False])
def test_batched_matching_is_torchvisions_matcher_per_image(allow_low_quality):
    generator = torch.Generator().manual_seed(0)
    gt = [
        random_boxes(5, generator),
        random_boxes(1, generator),
        random_boxes(0, generator),
        random_boxes(3, generator),
    ]
    gt[3][2] = gt[3][0]  # a duplicate box: ties for the best overlap
    candidates = [random_boxes(n, generator) for n in (300, 200, 250, 300)]
    padded_gt, gt_valid = pad_boxes(gt)
    padded_candidates, _ = pad_boxes(candidates)
    quality = pairwise_iou(padded_gt, padded_candidates)
    ours = match_boxes(quality, gt_valid, 0.7, 0.3, allow_low_quality)
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=allow_low_quality)
    for image, (image_gt, image_candidates) in enumerate(zip(gt, candidates)):
        count = len(image_candidates)
        if len(image_gt) == 0:
            assert (ours[image, :count] == -1).all()
            continue
        expected_quality = box_iou(image_gt, image_candidates)
        assert torch.equal(quality[image, : len(image_gt), :count], expected_quality)
        assert torch.equal(ours[image, :count], matcher(expected_quality))
    assert (ours[:, :300] >= 0).sum() > 0 and (ours == -2).sum() > 0


def test_balanced_sampling_draws_torchvisions_counts_uniformly():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 3, (3, 400), generator=generator)
    labels[1, :] = torch.where(labels[1] > 0, 0, labels[1])  # an image without positives
    labels[2, 10:] = -1  # an image with fewer candidates than the sample
    reference = BalancedPositiveNegativeSampler(64, 0.25)
    torch.manual_seed(0)
    positive, negative = sample_balanced(labels, 64, 0.25)
    expected_pos, expected_neg = reference(list(labels))
    for image in range(3):
        assert positive[image].sum() == expected_pos[image].sum()
        assert negative[image].sum() == expected_neg[image].sum()
        assert (labels[image][positive[image]] >= 1).all() and (labels[image][negative[image]] == 0).all()
    # every candidate equally likely: over 2000 draws each positive of image 0 is taken about 16/N of the time
    counts = torch.zeros(400)
    for _ in range(2000):
        counts += sample_balanced(labels, 64, 0.25)[0][0].float()
    share = counts[labels[0] >= 1] / 2000
    expected = 16 / int((labels[0] >= 1).sum())
    assert share.mean() == pytest.approx(expected, rel=1e-6)
    assert (share - expected).abs().max() < 0.05


def tiny_model(dice: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160, mask_dice_weight=dice)
    return build_model(cfg, num_classes=3).train()


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 120, 150, generator=generator), torch.rand(3, 140, 128, generator=generator)]
    masks = torch.zeros(2, 140, 128, dtype=torch.uint8)
    masks[0, 5:50, 30:100], masks[1, 0:40, 0:40] = 1, 1
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]),
            "labels": torch.tensor([1]),
            "masks": masks[:1, :120, :150],
        },
        {
            "boxes": torch.tensor([[30.0, 5.0, 100.0, 50.0], [0.0, 0.0, 40.0, 40.0]]),
            "labels": torch.tensor([2, 1]),
            "masks": masks,
        },
    ]
    targets[0]["masks"] = torch.ones(1, 120, 150, dtype=torch.uint8)
    return images, targets


def losses_and_gradients(model: torch.nn.Module, images, targets) -> tuple[dict, dict]:
    model.zero_grad()
    losses = model(images, targets)
    sum(value for key, value in losses.items() if key != DICE_LOSS).backward()  # torchvision has no Dice term
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {key: value.item() for key, value in losses.items()}, gradients


@pytest.mark.parametrize("dice", [0.0, 0.5])
def test_batched_targets_give_torchvisions_losses_and_gradients(dice):
    """The whole training forward and backward: our RPN (level NMS, batched targets) and RoI heads against
    torchvision's."""
    model = tiny_model(dice)
    assert type(model.rpn) is LevelNmsRegionProposalNetwork and isinstance(model.roi_heads, BatchedRoIHeads)
    for sampler in (model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler):
        sampler.batch_size_per_image = TAKE_ALL
    images, targets = batch()
    ours, our_gradients = losses_and_gradients(model, images, targets)
    model.rpn.__class__ = RegionProposalNetwork
    roi_class = type(model.roi_heads)
    model.roi_heads.__class__ = RoIHeads
    reference, reference_gradients = losses_and_gradients(model, images, targets)
    model.roi_heads.__class__ = roi_class
    if dice:
        assert ours.pop(DICE_LOSS) > 0
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert our_gradients.keys() == reference_gradients.keys()
    ours_flat = torch.cat([our_gradients[name].flatten() for name in reference_gradients])
    reference_flat = torch.cat([gradient.flatten() for gradient in reference_gradients.values()])
    assert (ours_flat - reference_flat).norm() <= 1e-5 * reference_flat.norm()  # float rounding only


def test_sampled_sets_have_torchvisions_sizes_with_positives_first():
    model = tiny_model()
    images, targets = batch()
    images, targets = model.transform(images, targets)
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features, targets)
    sample = model.roi_heads.sample_proposals(proposals, targets)
    torch.manual_seed(3)
    _, _, reference_labels, _ = RoIHeads.select_training_samples(model.roi_heads, proposals, targets)
    for labels, reference, positives in zip(sample.labels, reference_labels, sample.positives):
        assert len(labels) == len(reference) == 128  # the tiny preset's box_batch_size_per_image
        assert positives == int((reference > 0).sum()) > 0
        assert (labels[:positives] > 0).all() and (labels[positives:] == 0).all()


def test_images_without_ground_truth_train():
    model = tiny_model()
    images, targets = batch()
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 120, 150, dtype=torch.uint8),
    }
    for batch_targets in ([empty, targets[1]], [empty, {**empty, "masks": torch.zeros(0, 140, 128)}]):
        losses = model(images, batch_targets)
        assert all(torch.isfinite(value) for value in losses.values()), losses
        sum(losses.values()).backward()
