import pytest
import torch

from instseg.config import ModelConfig
from instseg.errors import ConfigError
from instseg.metrics.names import TRAIN_LOSS_KEYS
from instseg.models import build_model


def _tiny() -> ModelConfig:
    return ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160)


def test_tiny_forward_backward_gives_all_five_losses_and_gradients(synth_root):
    from instseg.data.coco import CocoInstanceDataset

    dataset = CocoInstanceDataset(synth_root, "train")
    model = build_model(_tiny(), dataset.label_map.num_classes).train()
    images, targets = zip(*(dataset[i] for i in range(2)))
    losses = model([image.float() / 255 for image in images], list(targets))
    assert set(losses) == set(TRAIN_LOSS_KEYS)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.roi_heads.mask_predictor.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_tiny_inference_outputs_masks_at_input_size():
    model = build_model(_tiny(), 4).eval()
    with torch.inference_mode():
        (output,) = model([torch.rand(3, 100, 130)])
    assert set(output) == {"boxes", "labels", "scores", "masks"}
    assert output["masks"].shape[1:] == (1, 100, 130)


def test_r50_v2_heads_are_sized_for_the_dataset():
    model = build_model(ModelConfig(arch="maskrcnn_resnet50_fpn_v2", weights="none"), 5)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules()), "v2 trains its BatchNorm"


def test_weights_from_a_state_dict_file(tmp_path):
    source = build_model(_tiny(), 4)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model(_tiny().model_copy(update={"weights": str(path)}), 4)
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(ConfigError, match="does not fit"):
        build_model(_tiny().model_copy(update={"weights": str(path)}), 7)
    with pytest.raises(ConfigError, match="file not found"):
        build_model(_tiny().model_copy(update={"weights": str(tmp_path / "missing.pt")}), 4)


def test_weights_value_is_validated():
    with pytest.raises(ValueError, match="DEFAULT, none"):
        ModelConfig(weights="imagenet")


def test_min_size_list_is_scale_jitter_in_training_and_last_size_in_eval():
    import torch

    cfg = ModelConfig(arch="tiny", weights="none", min_size=[96, 128], max_size=400)
    model = build_model(cfg, 4).train()
    sizes = {model.transform([torch.rand(3, 100, 130)], None)[0].image_sizes[0] for _ in range(30)}
    assert sizes == {(96, 124), (128, 166)}
    model.eval()
    assert model.transform([torch.rand(3, 100, 130)], None)[0].image_sizes[0] == (128, 166)
    with pytest.raises(ValueError, match="greater than or equal to 32"):
        ModelConfig(min_size=[10])
