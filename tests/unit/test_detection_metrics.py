"""Hand-computed cases for the Ultralytics-style metrics, and `instseg metrics` on real COCO results."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instseg.cli import main as cli_main
from instseg.metrics.detection import ConfusionMatrix, ap_per_class, compute_ap, match_predictions, matched_dice
from tests.helpers import shared_dir

COCOAPI = shared_dir() / "coco_eval" / "cocoapi_val2014_100"


def test_match_predictions_is_one_to_one_same_class_by_iou():
    iou = np.array([[0.9, 0.6, 0.0], [0.0, 0.0, 0.55]])  # [true, pred]
    correct = match_predictions(np.array([0, 0, 1]), np.array([0, 1]), iou, np.array([0.5, 0.75]))
    assert correct.tolist() == [[True, True], [False, False], [True, False]]
    wrong_class = match_predictions(np.array([1]), np.array([0]), np.array([[0.9]]), np.array([0.5]))
    assert wrong_class.tolist() == [[False]]


def test_compute_ap_hand_values():
    assert compute_ap(np.array([1.0]), np.array([1.0]))[0] == pytest.approx(0.995)  # Ultralytics' "perfect"
    assert compute_ap(np.array([0.5]), np.array([1.0]))[0] == pytest.approx(0.75)  # 0.5 flat + triangle 0.25


def test_ap_per_class_curves_and_best_f1():
    tp = np.array([[True] * 10, [True] * 10])
    curves = ap_per_class(tp, np.array([0.9, 0.6]), np.array([0, 0]), np.array([0, 0]))
    assert curves.ap[0, 0] == pytest.approx(0.995)
    best = curves.mean_at_best()
    assert best == {"precision": 1.0, "recall": 1.0, "f1": pytest.approx(1.0)}
    assert curves.best_confidence <= 0.6
    # above 0.9 nothing is predicted: recall 0, precision 1 by convention
    assert curves.r_curve[0, -1] == 0.0 and curves.p_curve[0, -1] == 1.0
    # one true positive at 0.9, a false positive at 0.8: precision 0.5 at conf 0.7, recall 0.5 of 2 labels
    half = ap_per_class(np.array([[True] * 10, [False] * 10]), np.array([0.9, 0.8]), np.array([0, 0]), np.array([0, 0]))
    assert half.p_curve[0, 700] == pytest.approx(0.5) and half.r_curve[0, 700] == pytest.approx(0.5)
    # envelope: precision 1 up to recall 0.5, where it falls to 0.5, then linear to 0 at recall 1; on the
    # 101-point grid: 0.49 * 1 + the 0.49-0.50 step (1 + 0.5) / 2 * 0.01 + the triangle 0.5 * 0.5 * 0.5
    assert half.ap[0, 0] == pytest.approx(0.49 + 0.0075 + 0.125)


def test_confusion_matrix_counts_confusions_misses_and_false_alarms():
    cm = ConfusionMatrix(nc=2, conf=0.25, iou=0.45)
    # gt0 (class 0) found as class 0; gt1 (class 1) found as class 0; a 0.1-confidence box is ignored
    cm.process(
        np.array([0, 1, 0]), np.array([0.9, 0.1, 0.8]), np.array([0, 1]), np.array([[0.9, 0.0, 0.0], [0.0, 0.7, 0.6]])
    )
    cm.process(np.array([1]), np.array([0.5]), np.array([], dtype=int), np.zeros((0, 1)))  # false alarm
    cm.process(np.array([], dtype=int), np.array([]), np.array([1]), np.zeros((1, 0)))  # missed
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    assert cm.normalized()[:, 1].tolist() == [0.5, 0.0, 0.5]


def test_dice_of_a_matched_pair():
    # areas 20 (pred) and 30 (true) overlapping in 20 px: IoU 2/3 -> matched; Dice = 2*20 / 50
    dice, classes = matched_dice(
        np.array([20.0]), np.array([30.0]), np.array([[20.0]]), np.array([[2 / 3]]), np.array([0]), np.array([0])
    )
    assert dice.tolist() == [pytest.approx(0.8)] and classes.tolist() == [0]
    dice, _ = matched_dice(
        np.array([10.0]), np.array([30.0]), np.array([[10.0]]), np.array([[1 / 3]]), np.array([0]), np.array([0])
    )
    assert dice.size == 0, "IoU below 0.5: not matched"


def test_metrics_cli_on_ground_truth_as_results(tmp_path, synth_root, capsys):
    gt_path = synth_root / "annotations" / "instances_val.json"
    gt = json.loads(gt_path.read_text())
    images = {i["id"]: i for i in gt["images"]}
    results = []
    for ann in gt["annotations"]:
        image = images[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 0.9,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            }
        )
    (tmp_path / "r.json").write_text(json.dumps(results))
    assert cli_main(["metrics", str(gt_path), str(tmp_path / "r.json"), "--out", str(tmp_path / "m")]) == 0
    report = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert report["segm_map50"] == pytest.approx(1.0) and report["precision"] == 1.0 and report["recall"] == 1.0
    assert report["dice"] == pytest.approx(1.0)
    matrix = np.array(report["confusion_matrix"])
    assert matrix.trace() == len(gt["annotations"]) and matrix.sum() == len(gt["annotations"])
    assert set(report["per_class_ap"]) == {"circle", "rectangle", "triangle"}
    for name in (
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "PR_curve.png",
        "P_curve.png",
        "R_curve.png",
        "F1_curve.png",
    ):
        assert (tmp_path / "m" / name).stat().st_size > 1000, name


@pytest.mark.skipif(not COCOAPI.is_dir(), reason=f"shared COCO eval data not found at {COCOAPI}")
def test_metrics_cli_reproduces_official_cocoapi_numbers(tmp_path, capsys):
    gt = COCOAPI / "annotations" / "instances_val2014_100.json"
    results = COCOAPI / "results" / "instances_val2014_fakebbox100_results.json"
    assert cli_main(["metrics", str(gt), str(results), "--iou-type", "bbox", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["bbox_map"] == pytest.approx(0.5045806987249628, abs=1e-9)
    assert report["bbox_mar_large"] == pytest.approx(0.5642905982905982, abs=1e-9)
    assert len(report["confusion_matrix"]) == 81


def test_metrics_cli_bad_input_exits_2(tmp_path, synth_root, capsys):
    gt = synth_root / "annotations" / "instances_val.json"
    assert cli_main(["metrics", str(gt), str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text(
        json.dumps([{"image_id": 999999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}])
    )
    assert cli_main(["metrics", str(gt), str(tmp_path / "bad.json")]) == 2
    assert "image_id 999999 is not an image of the ground truth" in capsys.readouterr().err
