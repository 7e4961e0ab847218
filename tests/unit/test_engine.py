import pytest
import torch

from instseg.config import ModelConfig
from instseg.data.coco import CocoInstanceDataset
from instseg.data.loaders import collate
from instseg.engine.early_stopping import EarlyStopping
from instseg.engine.loops import validation_loss
from instseg.models import build_model


def _batches(synth_root):
    dataset = CocoInstanceDataset(synth_root, "val")
    return [collate([dataset[0], dataset[1]]), collate([dataset[2]])]


def test_validation_loss_changes_no_weight_and_no_batchnorm_statistic(synth_root):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160), 4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = validation_loss(model, _batches(synth_root), torch.device("cpu"))
    assert {"val/loss", "val/loss_mask", "val/loss_classifier"} <= set(losses) and losses["val/loss"] > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training, "the model's mode is restored"
    # the same pass in plain train mode would have moved the running statistics: the test can fail
    model.train()
    with torch.no_grad():
        model(*[[img.float() / 255 for img in _batches(synth_root)[0][0]], _batches(synth_root)[0][1]])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if "running_mean" in k)


def test_validation_loss_does_not_depend_on_or_move_the_random_stream(synth_root, overfit_weights):
    model = build_model(ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160), 4)
    model.load_state_dict(torch.load(overfit_weights, weights_only=True))
    torch.manual_seed(1)
    first = validation_loss(model, _batches(synth_root), torch.device("cpu"))
    after = torch.random.get_rng_state()
    torch.manual_seed(2)
    again = validation_loss(model, _batches(synth_root), torch.device("cpu"))
    assert again == first, "the sampling is seeded, not drawn from the stream"
    torch.manual_seed(1)
    assert torch.equal(after, torch.random.get_rng_state()), "training's random stream is left where it was"


def test_early_stopping_counts_epochs_without_improvement_beyond_min_delta():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert [stopper.step(v, e) for e, v in enumerate([0.10, 0.20, 0.205, 0.209], start=1)] == [
        False,
        False,
        False,
        True,
    ]
    assert (stopper.best, stopper.best_epoch, stopper.stopped_epoch) == (0.20, 2, 4)
    assert "best 0.20000 at epoch 2" in stopper.reason and "stopped after epoch 4" in stopper.reason
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored == stopper
    never = EarlyStopping(patience=0)
    assert not any(never.step(0.0, e) for e in range(1, 20))


def test_soft_dice_loss_hand_values():
    from instseg.models.dice_heads import soft_dice_loss

    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    perfect = torch.tensor([[20.0, 20.0, -20.0, -20.0]])
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # sigmoid(0) = 0.5 everywhere: |P|=2, |T|=2, |P∩T|=1 -> 1 - (2 + 1) / (4 + 1)
    assert soft_dice_loss(torch.zeros(1, 4), target).item() == pytest.approx(1 - 3 / 5)


def test_mask_dice_weight_adds_a_trainable_loss_term(synth_root):
    from instseg.models.dice_heads import DICE_LOSS, DiceRoIHeads

    dataset = CocoInstanceDataset(synth_root, "train")
    images, targets = collate([dataset[0], dataset[1]])
    images = [image.float() / 255 for image in images]
    torch.manual_seed(0)
    plain = build_model(ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160), 4).train()
    assert DICE_LOSS not in plain(images, targets)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160, mask_dice_weight=0.5), 4
    ).train()
    assert isinstance(model.roi_heads, DiceRoIHeads)
    losses = model(images, targets)
    assert 0 < losses[DICE_LOSS].item() <= 0.5
    losses[DICE_LOSS].backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    assert set(plain.state_dict()) == set(model.state_dict()), "checkpoints stay interchangeable"
    with torch.inference_mode():
        assert set(model.eval()([images[0]])[0]) == {"boxes", "labels", "scores", "masks"}
