import urllib.error

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from instseg.config import ModelConfig
from instseg.errors import ConfigError
from instseg.metrics.names import TRAIN_LOSS_KEYS
from instseg.models import build_model
from instseg.models.weights import CLASS_HEAD_PREFIXES, OFFLINE_ENV
from tests.helpers import DEMO_CONFIG


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
    loaded = build_model(_tiny().model_copy(update={"weights": str(path)}), 4).state_dict()
    # pretrained weights get torchvision's fine-tuning layout (frozen BatchNorm keeps no step counter)
    for key, value in source.state_dict().items():
        assert key.endswith("num_batches_tracked") or torch.equal(value, loaded[key]), key
    # another class count: everything but the class-specific layers loads, those start fresh (fine-tuning)
    other = build_model(_tiny().model_copy(update={"weights": str(path)}), 7)
    assert other.roi_heads.box_predictor.cls_score.out_features == 7
    assert torch.equal(other.backbone.body.state_dict()["0.0.weight"], source.backbone.body.state_dict()["0.0.weight"])
    with pytest.raises(ConfigError, match="weights file not found"):
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


COCO_V2_FILE = "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"  # torchvision's published names (url basenames)
RESNET50_FILE = "resnet50-0676ba61.pth"
MOBILENET_FILE = "mobilenet_v3_large-8738ca79.pth"


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """State dicts in the published files' key layout, made here (nothing is downloaded): COCO Mask R-CNN v2
    (91 classes), ImageNet ResNet-50 and MobileNetV3-Large (their classifiers included)."""
    from torchvision.models import mobilenet_v3_large, resnet50
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    coco = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    torch.save(coco.state_dict(), folder / COCO_V2_FILE)
    torch.save(resnet50().state_dict(), folder / RESNET50_FILE)
    torch.save(mobilenet_v3_large().state_dict(), folder / MOBILENET_FILE)
    return folder


def _r50(**update) -> ModelConfig:
    return ModelConfig(arch="maskrcnn_resnet50_fpn_v2", min_size=128, max_size=160, **update)


def test_official_coco_file_loads_with_heads_replaced_for_the_dataset(official_files):
    coco = torch.load(official_files / COCO_V2_FILE, weights_only=True)
    model = build_model(_r50(weights=str(official_files / COCO_V2_FILE)), 4)
    state = model.state_dict()
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    reinitialised = {k for k in coco if k.startswith(CLASS_HEAD_PREFIXES)}
    heads = {
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred",
        "roi_heads.mask_predictor.mask_fcn_logits",
    }
    assert {k.rsplit(".", 1)[0] for k in reinitialised} == heads
    assert reinitialised and all(torch.equal(state[k], v) for k, v in coco.items() if k not in reinitialised)
    # the fine-tuning layout torchvision uses for pretrained weights: stem and layer1 frozen (3 trainable stages)
    frozen = {name.split(".")[0] for name, p in model.backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}


def test_imagenet_backbone_files_load_into_the_backbone(official_files):
    resnet = torch.load(official_files / RESNET50_FILE, weights_only=True)
    model = build_model(_r50(weights="none", backbone_weights=str(official_files / RESNET50_FILE)), 4)
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in resnet.items() if k in body) and "fc.weight" not in body
    mobilenet = torch.load(official_files / MOBILENET_FILE, weights_only=True)
    tiny = build_model(_tiny().model_copy(update={"backbone_weights": str(official_files / MOBILENET_FILE)}), 4)
    body = tiny.backbone.body.state_dict()
    assert all(torch.equal(body[k], mobilenet[f"features.{k}"]) for k in ("0.0.weight", "13.block.0.0.weight"))
    assert isinstance(tiny.backbone.body["1"].block[0][1], FrozenBatchNorm2d), "pretrained: frozen BatchNorm"


def test_a_file_that_does_not_fit_names_the_missing_keys(official_files, tmp_path):
    message = r"does not fit this model: missing keys backbone\.body\.conv1\.weight.*set it as model.backbone_weights"
    with pytest.raises(ConfigError, match=message):
        build_model(_r50(weights=str(official_files / RESNET50_FILE)), 4)
    with pytest.raises(ConfigError, match=r"does not fit the backbone: missing keys 0\.0\.weight"):
        build_model(_tiny().model_copy(update={"backbone_weights": str(official_files / RESNET50_FILE)}), 4)
    (tmp_path / "notes.pt").write_text("not a tensor file")
    with pytest.raises(ConfigError, match="not a readable state dict"):
        build_model(_tiny().model_copy(update={"weights": str(tmp_path / "notes.pt")}), 4)


def test_default_weights_offline_name_the_file_where_it_goes_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / COCO_V2_FILE
    with pytest.raises(ConfigError) as error:
        build_model(_r50(weights="DEFAULT"), 4)
    message = str(error.value)
    assert "\n" not in message and str(expected) in message
    assert f"curl -L -o {COCO_V2_FILE} https://download.pytorch.org/models/{COCO_V2_FILE}" in message
    # a failed download (no network) says the same, with the reason; the seam is torch.hub's downloader
    monkeypatch.delenv(OFFLINE_ENV)

    def no_network(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ConfigError, match=r"could not be downloaded \(<urlopen error \[Errno -3\].*TORCH_HOME"):
        build_model(ModelConfig(arch="tiny", weights="DEFAULT", min_size=128, max_size=160), 4)
    assert not list((tmp_path / "torch").rglob("*.pth")), "nothing half-downloaded is left"


def test_default_weights_come_from_the_hub_cache_without_network(official_files, tmp_path, monkeypatch):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / COCO_V2_FILE).symlink_to(official_files / COCO_V2_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    model = build_model(_r50(weights="DEFAULT"), 3)
    coco = torch.load(official_files / COCO_V2_FILE, weights_only=True)
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(model.state_dict()[key], coco[key])


def test_training_entry_point_stops_on_missing_weights_before_any_worker(tmp_path, monkeypatch, capsys, synth_root):
    from ray_jobs.cli_common import run_cli
    from ray_jobs.train import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    argv = [
        "--config",
        str(DEMO_CONFIG),
        f"data.root={synth_root}",
        "model.arch=maskrcnn_resnet50_fpn_v2",
        "model.weights=DEFAULT",
    ]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and COCO_V2_FILE in err and "Traceback" not in err
    assert run_cli(main, [*argv[:-1], f"model.weights={tmp_path / 'nowhere.pth'}"]) == 2
    assert "model.weights: file not found" in capsys.readouterr().err


def test_a_bundle_loads_without_the_files_its_training_started_from(official_files, tmp_path):
    import shutil

    from instseg.data.coco import LabelMap
    from instseg.models.bundle import load_bundle, write_bundle

    backbone = tmp_path / MOBILENET_FILE
    shutil.copy(official_files / MOBILENET_FILE, backbone)
    cfg = _tiny().model_copy(update={"backbone_weights": str(backbone)})
    trained = build_model(cfg, 4).eval()
    labels = LabelMap((1, 2, 3), ("circle", "rectangle", "triangle")).to_dict()
    write_bundle(tmp_path / "bundle", trained.state_dict(), cfg.model_dump(), labels)
    backbone.unlink()
    model, _, meta = load_bundle(tmp_path / "bundle")
    assert meta["model"]["weights"] == meta["model"]["backbone_weights"] == "none"
    image = [torch.rand(3, 128, 160)]
    with torch.inference_mode():
        assert torch.equal(model(image)[0]["boxes"], trained(image)[0]["boxes"])
