"""build_model(cfg, num_classes): torchvision Mask R-CNN with heads sized for the dataset.

Architectures:
    maskrcnn_resnet50_fpn_v2  the default (Li et al. 2021 improvements: better mAP, trainable BN)
    maskrcnn_resnet50_fpn     the original v1
    tiny                      mobilenet_v3_large-FPN at strides 8/16/32 with slim heads: a CPU preset for
                              tests and the demo (about 0.07 s per 128x160 image per train step on one core)
Weights (instseg.models.weights): `model.weights` DEFAULT (COCO for the R50 models, the ImageNet backbone for
tiny), none (random init) or a state-dict file; `model.backbone_weights` DEFAULT or a file for an ImageNet
backbone under fresh detection layers. With pretrained weights the network takes torchvision's fine-tuning
layout: the first backbone stages frozen (model.trainable_backbone_layers), BatchNorm frozen where
torchvision freezes it (v1, tiny).
Every model also gets four stateless swaps of torchvision parts, the same weights and state dicts: an RPN with NMS
level by level and batched training targets (instseg.models.rpn), RoI heads with batched training targets
(instseg.models.roi_heads), box decoding in float32 under autocast (instseg.models.box_coding) and all masks of an
image pasted at once (instseg.models.paste).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from instseg.config import WEIGHT_KEYS, ModelConfig
from instseg.errors import ConfigError
from instseg.models.box_coding import use_float32_box_decoding
from instseg.models.dice_heads import DiceRoIHeads
from instseg.models.paste import use_batched_paste
from instseg.models.roi_heads import use_batched_roi_heads
from instseg.models.rpn import use_level_nms
from instseg.models.weights import (
    fit_backbone_weights,
    fit_model_weights,
    is_default,
    is_none,
    load_published,
    load_state_dict_file,
    published,
)

RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # trained first to last as trainable layers grow
# tiny: mobilenet_v3_large blocks whose outputs are at strides 8, 16 and 32 (40, 80, 160 channels). The stride-8
# level matters: at 128 px, stride 32 alone is a 4x5 grid, too coarse for 16-70 px objects and their masks
TINY_RETURN_LAYERS = {"4": "0", "7": "1", "13": "2"}
TINY_FPN_CHANNELS = 64
TINY_HEAD_CHANNELS = 64
# two sizes per level (strides 8, 16, 32 and the max-pooled 64), three aspect ratios: 16-192 px objects
TINY_ANCHOR_SIZES = ((16, 24), (32, 48), (64, 96), (128, 192))


def _common_kwargs(cfg: ModelConfig) -> dict:
    return {
        "min_size": tuple(cfg.min_size) if isinstance(cfg.min_size, list) else cfg.min_size,
        "max_size": cfg.max_size,
        "box_score_thresh": cfg.box_score_thresh,
        "box_detections_per_img": cfg.box_detections_per_img,
    }


def _freeze_resnet_stages(body: nn.Module, trainable: int) -> None:
    """torchvision's rule: only the last `trainable` ResNet stages (and bn1 with all five) get gradients."""
    train = RESNET_STAGES[:trainable] + (("bn1",) if trainable == 5 else ())
    for name, parameter in body.named_parameters():
        if not name.startswith(train):
            parameter.requires_grad_(False)


def _build_r50(cfg: ModelConfig, num_classes: int, pretrained: bool) -> MaskRCNN:
    if pretrained and cfg.trainable_backbone_layers > 5:
        raise ConfigError(
            f"model.trainable_backbone_layers must be 0-5 for {cfg.arch} (got {cfg.trainable_backbone_layers})"
        )
    trainable = cfg.trainable_backbone_layers if pretrained else 5
    if cfg.arch == "maskrcnn_resnet50_fpn":
        # v1 fine-tunes with frozen BatchNorm, as torchvision builds it for pretrained weights
        norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=norm, trainable_layers=trainable
        )
        return MaskRCNN(backbone, num_classes=num_classes, **_common_kwargs(cfg))
    model = maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=num_classes, **_common_kwargs(cfg)
    )
    _freeze_resnet_stages(model.backbone.body, trainable)
    return model


def _build_tiny(cfg: ModelConfig, num_classes: int, pretrained: bool) -> MaskRCNN:
    # from scratch, frozen BN would be an identity: train real BN then; pretrained, freeze it as torchvision does
    features = mobilenet_v3_large(weights=None, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d).features
    stage_starts = (
        [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    )
    trainable = cfg.trainable_backbone_layers if pretrained else len(stage_starts)
    freeze_before = len(features) if trainable == 0 else stage_starts[len(stage_starts) - trainable]
    for block in features[:freeze_before]:
        block.requires_grad_(False)
    in_channels = [features[int(index)].out_channels for index in TINY_RETURN_LAYERS]
    backbone = BackboneWithFPN(
        features, TINY_RETURN_LAYERS, in_channels, TINY_FPN_CHANNELS, extra_blocks=LastLevelMaxPool()
    )
    levels = [*TINY_RETURN_LAYERS.values()]
    anchors = AnchorGenerator(sizes=TINY_ANCHOR_SIZES, aspect_ratios=((0.5, 1.0, 2.0),) * len(TINY_ANCHOR_SIZES))
    return MaskRCNN(
        backbone,
        num_classes=None,  # the predictors below carry the class count
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(TINY_FPN_CHANNELS * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        box_batch_size_per_image=128,
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(TINY_FPN_CHANNELS, (TINY_HEAD_CHANNELS, TINY_HEAD_CHANNELS), 1),
        mask_predictor=MaskRCNNPredictor(TINY_HEAD_CHANNELS, TINY_HEAD_CHANNELS, num_classes),
        **_common_kwargs(cfg),
    )


def _overwrite_frozen_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = eps


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Mask R-CNN for `num_classes` classes (background included), weights loaded as the config says."""
    pretrained = not (is_none(cfg.weights) and is_none(cfg.backbone_weights))
    model = (
        _build_tiny(cfg, num_classes, pretrained) if cfg.arch == "tiny" else _build_r50(cfg, num_classes, pretrained)
    )
    if cfg.mask_dice_weight > 0:
        model.roi_heads = DiceRoIHeads.from_heads(model.roi_heads, cfg.mask_dice_weight)
    use_batched_paste(model)  # inference pastes all masks of an image at once (instseg.models.paste)
    use_level_nms(model)  # proposals suppressed one FPN level per NMS call (instseg.models.rpn)
    use_batched_roi_heads(model)  # RoIs matched and sampled for the batch at once (instseg.models.roi_heads)
    use_float32_box_decoding(model)  # bf16 autocast keeps float32 boxes (instseg.models.box_coding)
    for key in WEIGHT_KEYS:  # at most one is set (config validation)
        value = getattr(cfg, key)
        if is_none(value):
            continue
        if is_default(value):
            source, whole = published(cfg.arch, key)
            state, name = load_published(source, f"model.{key}"), f"model.{key}=DEFAULT ({source})"
        else:
            state, whole, name = load_state_dict_file(value), key == "weights", f"model.{key}={value}"
        if whole:
            fit_model_weights(model, state, name)
            if cfg.arch == "maskrcnn_resnet50_fpn":
                _overwrite_frozen_eps(model, 0.0)  # torchvision's v1 COCO weights were trained with eps 0
        else:
            fit_backbone_weights(model.backbone.body, state, name)
    return model
