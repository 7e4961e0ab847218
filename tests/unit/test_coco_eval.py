import json

import pytest
import torch
from pycocotools import mask as mask_utils

from instseg.data.coco import CocoInstanceDataset, load_coco
from instseg.metrics.coco_eval import CocoEvaluator, coco_stats, device_rle
from instseg.metrics.fitness import fitness
from instseg.metrics.names import COCO_STAT_NAMES
from tests.helpers import shared_dir

COCOAPI = shared_dir() / "coco_eval" / "cocoapi_val2014_100"


def test_ground_truth_as_predictions_scores_perfectly(synth_root):
    dataset = CocoInstanceDataset(synth_root, "val")
    evaluator = CocoEvaluator(dataset.coco, dataset.label_map)
    for index in range(len(dataset)):
        _, target = dataset[index]
        n = len(target["labels"])
        output = {
            "boxes": target["boxes"],
            "labels": target["labels"],
            "scores": torch.linspace(1.0, 0.5, n),
            "masks": target["masks"][:, None].float(),
        }
        evaluator.process([target], [output])
    metrics = evaluator.compute()
    assert metrics["val/bbox_map50"] == pytest.approx(1.0)
    assert metrics["val/segm_map50"] == pytest.approx(1.0)
    assert metrics["val/segm_map"] > 0.9
    evaluator.reset()
    assert evaluator.compute()["val/segm_map"] == 0.0, "no detections -> zeros, not a pycocotools crash"


def test_fitness_is_the_weighted_sum_and_ignores_minus_one():
    metrics = {"val/segm_map": 0.5, "val/bbox_map": -1.0}
    assert fitness(metrics, {"val/segm_map": 0.9, "val/bbox_map": 0.1}) == pytest.approx(0.45)
    with pytest.raises(KeyError):
        fitness(metrics, {"val/segm_map50": 1.0})


# the official cocoapi output for its demo detections (shared/coco_eval/.../SOURCE.md)
OFFICIAL = {
    "bbox": (0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443, 0.5193996948036719,
             0.5013978986347466, 0.38681277964578054, 0.5936795762842003, 0.595352982877607, 0.6398109626113442,
             0.5664205978994309, 0.5642905982905982),
    "segm": (0.3195452758576433, 0.5622883972521636, 0.29892653412086784, 0.3873740315997838, 0.31018272403369485,
             0.3269339071005138, 0.2682297225711534, 0.41544868114906375, 0.4168394992198818, 0.4694498622754236,
             0.37675922666197265, 0.3814715099715099),
}  # fmt: skip


@pytest.mark.skipif(not COCOAPI.is_dir(), reason=f"shared COCO eval data not found at {COCOAPI}")
@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_official_cocoapi_numbers(iou_type, backend):
    """Both scoring backends give all 12 x 2 official stats to 1e-9. faster-coco-eval turns the polygons it
    indexes into RLE: it works on its own copy, so the ground truth stays as it was (pycocotools has always
    written RLE into the ground truth it scores masks against: left as it is)."""
    gt = load_coco(COCOAPI / "annotations" / "instances_val2014_100.json")
    before = json.dumps(gt.dataset, sort_keys=True)
    results = json.loads((COCOAPI / "results" / f"instances_val2014_fake{iou_type}100_results.json").read_text())
    stats = coco_stats(gt, results, iou_type, sorted(gt.getImgIds()), backend=backend)
    assert len(stats) == len(COCO_STAT_NAMES)
    assert stats == pytest.approx(OFFICIAL[iou_type], abs=1e-9)
    if backend == "faster":
        assert json.dumps(gt.dataset, sort_keys=True) == before


def test_rle_found_on_the_device_is_pycocotools_encoding():
    """device_rle (how CocoEvaluator encodes masks on a GPU) runs on any device: here on the CPU."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(7, 50, 40, dtype=torch.bool)  # [N, W, H], as binary_masks hands them over
    masks[0] = True
    masks[2, 10:30, 5:20] = True
    masks[3] = torch.rand(50, 40, generator=generator) > 0.5
    masks[4, 0, 0] = masks[5, -1, -1] = True  # a run of one at either end
    masks[6, :, 0] = True
    expected = mask_utils.encode(masks.view(torch.uint8).numpy().transpose(2, 1, 0))
    assert device_rle(masks) == expected
