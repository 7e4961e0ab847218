"""build_model(cfg, num_classes): torchvision Mask R-CNN with heads sized for the dataset.

Architectures:
    maskrcnn_resnet50_fpn_v2  the default (Li et al. 2021 improvements: better mAP, trainable BN)
    maskrcnn_resnet50_fpn     the original v1
    tiny                      mobilenet_v3_large-FPN backbone with slim heads: a CPU preset for
                              tests and the demo (about 0.15 s per 128 px image per train step on 2 cores)
Weights: DEFAULT (COCO weights for the R50 models, ImageNet backbone for tiny; downloaded by
torchvision on first use), none (random init), or a path to a state dict saved by instseg.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_Weights,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from instseg.config import ModelConfig
from instseg.errors import ConfigError
from instseg.models.dice_heads import DiceRoIHeads

_R50_BUILDERS = {
    "maskrcnn_resnet50_fpn_v2": (maskrcnn_resnet50_fpn_v2, MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT),
    "maskrcnn_resnet50_fpn": (maskrcnn_resnet50_fpn, MaskRCNN_ResNet50_FPN_Weights.DEFAULT),
}


def _common_kwargs(cfg: ModelConfig) -> dict:
    return {
        "min_size": tuple(cfg.min_size) if isinstance(cfg.min_size, list) else cfg.min_size,
        "max_size": cfg.max_size,
        "box_score_thresh": cfg.box_score_thresh,
        "box_detections_per_img": cfg.box_detections_per_img,
    }


def _replace_predictors(model: MaskRCNN, num_classes: int) -> None:
    """Swap the COCO-sized box and mask predictors for ones sized to the dataset."""
    box_in = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_in, num_classes)
    mask_in = model.roi_heads.mask_predictor.conv5_mask.in_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_in, mask_in, num_classes)


def _build_r50(cfg: ModelConfig, num_classes: int, pretrained: bool) -> MaskRCNN:
    builder, default_weights = _R50_BUILDERS[cfg.arch]
    if not pretrained:
        return builder(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,  # random init: every layer trains
            **_common_kwargs(cfg),
        )
    model = builder(weights=default_weights, trainable_backbone_layers=cfg.trainable_backbone_layers, **_common_kwargs(cfg))
    _replace_predictors(model, num_classes)
    return model


def _build_tiny(cfg: ModelConfig, num_classes: int, pretrained: bool) -> MaskRCNN:
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        weights=MobileNet_V3_Large_Weights.IMAGENET1K_V1 if pretrained else None,
        fpn=True,
        trainable_layers=cfg.trainable_backbone_layers if pretrained else 6,
        returned_layers=[4, 5],
        # from scratch, frozen BN (torchvision's default here) is an identity: train real BN instead
        norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d,
    )
    channels = backbone.out_channels
    # small objects at 128-160 px: anchors from 16 px, three levels ("0", "1", "pool")
    anchors = AnchorGenerator(sizes=((16, 32, 64, 128),) * 3, aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(
        backbone,
        num_classes=None,  # the predictors below carry the class count
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        box_batch_size_per_image=128,
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, (64, 64), 1),
        mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
        **_common_kwargs(cfg),
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pt file: plain tensors only (weights_only=True never runs pickled code)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # an instseg training checkpoint
    return state


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Mask R-CNN for `num_classes` classes (background included)."""
    weights = cfg.weights
    is_path = weights.endswith((".pt", ".pth"))
    if is_path and not Path(weights).is_file():
        raise ConfigError(f"model.weights: file not found: {weights}")
    pretrained = weights.upper() == "DEFAULT"
    model = _build_tiny(cfg, num_classes, pretrained) if cfg.arch == "tiny" else _build_r50(cfg, num_classes, pretrained)
    if cfg.mask_dice_weight > 0:
        model.roi_heads = DiceRoIHeads.from_heads(model.roi_heads, cfg.mask_dice_weight)
    if is_path:
        try:
            model.load_state_dict(load_state_dict_file(weights))
        except RuntimeError as exc:
            raise ConfigError(f"model.weights: {weights} does not fit {cfg.arch} with {num_classes} classes ({str(exc).splitlines()[0]})") from None
    return model
