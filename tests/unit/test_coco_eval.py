import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from instseg.data.coco import CocoInstanceDataset
from instseg.data.ground_truth import load_coco
from instseg.metrics.coco_eval import CocoEvaluator, device_rle
from instseg.metrics.coco_scoring import coco_stats
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


def test_results_are_refused_or_taken_as_the_one_by_one_rle_check_decides():
    """check_results decodes every result's RLE at once (numpy, over the cores): it must take and refuse exactly
    what the one-string-at-a-time check (schema.rle_covers) takes and refuses, first bad detection named."""
    import random

    from instseg.data.schema import _sound_rle_strings, check_results, rle_covers
    from instseg.errors import DataError

    rng = random.Random(5)
    mask = np.zeros((5, 6), dtype=np.uint8, order="F")
    mask[1:3, 2:5] = 1
    good = mask_utils.encode(mask)["counts"].decode()
    strings = [good, "", "garbage!!", "PPYo0", "0" * 3, "```````0", "<1"]
    # more than PARALLEL_RLE_STRINGS: the strings are decoded in worker processes
    strings += ["".join(chr(48 + rng.randrange(0, 66)) for _ in range(rng.randrange(0, 8))) for _ in range(21_000)]
    results = [{"segmentation": {"size": [5, 6], "counts": text}} for text in strings]
    sound = _sound_rle_strings(results)
    for index, result in enumerate(results):
        assert (sound.get(index, False) or rle_covers(result["segmentation"])) == rle_covers(result["segmentation"])
    images = {1: {"height": 5, "width": 6}}
    detections = [{"image_id": 1, "category_id": 1, "score": 0.5, **r} for r in results]
    first_bad = next(i for i, r in enumerate(results) if not rle_covers(r["segmentation"]))
    with pytest.raises(DataError, match=f"results.json: detection {first_bad}: --iou-type segm needs"):
        check_results(detections, "results.json", images, {1}, "segm")
    assert check_results(detections[:1], "results.json", images, {1}, "segm") == detections[:1]
