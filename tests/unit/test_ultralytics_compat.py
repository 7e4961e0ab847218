"""metrics.ultralytics_compat / `instseg metrics --ultralytics`: Ultralytics 8.x's matching, F1 smoothing and
segmentation confusion matrix, checked against numbers worked out by hand from their published algorithm
(ultralytics/engine/validator.py match_predictions, ultralytics/utils/metrics.py smooth, ap_per_class,
ConfusionMatrix, and the segmentation validator, which feeds the confusion matrix boxes)."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instseg.cli import main as cli_main
from instseg.metrics.detection import CURVE_POINTS, ap_per_class, match_predictions, smooth
from instseg.metrics.report import curves_matrix_dice

# Two ground truths of one class, two predictions (P0 scores 0.9, P1 0.6). IoU [truth, prediction]:
#   GT0: P0 0.72, P1 0.83        GT1: P0 0.56, P1 0
IOU = np.array([[0.72, 0.83], [0.56, 0.0]])
SAME_CLASS = np.zeros(2, dtype=int)


def test_ultralytics_pairs_a_truth_with_its_lowest_index_prediction_not_its_best():
    # At IoU 0.50-0.70 the pairs by decreasing IoU are (GT0,P1 .83), (GT0,P0 .72), (GT1,P0 .56). Each prediction
    # keeps its best truth: P1-GT0, P0-GT0. Ultralytics' np.unique has re-sorted them by prediction, so GT0
    # keeps P0 (first by index); ours keeps P1 (higher IoU). At 0.75 and 0.80 only (GT0,P1) is left; none above.
    ultralytics = match_predictions(SAME_CLASS, SAME_CLASS, IOU, ultralytics=True)
    ours = match_predictions(SAME_CLASS, SAME_CLASS, IOU)
    assert ultralytics.tolist() == [[True] * 5 + [False] * 5, [False] * 5 + [True] * 2 + [False] * 3]
    assert ours.tolist() == [[False] * 10, [True] * 7 + [False] * 3]


def test_those_pairs_give_ultralytics_ap50_by_hand():
    # Ultralytics at IoU 0.5: P0 (0.9) is a TP, P1 (0.6) an FP: recall [.5, .5], precision [1, .5]. Envelope over
    # recall [0, .5, .5, 1] is [1, 1, .5, 0]; on 101 points it is 1 up to recall .49, .5 at .5 (np.interp takes
    # the right-hand value at a repeated recall), then 1 - r: trapezoids 0.49 + 0.01 (1 + .5) / 2
    # + 0.01 (.5 + .49) / 2 + .49 * .49 / 2 = 0.6225.
    # Ours: P0 FP, P1 TP: recall [0, .5], precision [0, .5]; envelope [1, .5, .5, 0] is .5 up to recall .5, then
    # 1 - r: 0.25 + 0.125 = 0.375.
    conf = np.array([0.9, 0.6])
    for ultralytics, expected in ((True, 0.6225), (False, 0.375)):
        tp = match_predictions(SAME_CLASS, SAME_CLASS, IOU, ultralytics=ultralytics)
        curves = ap_per_class(tp, conf, SAME_CLASS, SAME_CLASS, smooth_f1=ultralytics)
        assert curves.ap[0, 0] == pytest.approx(expected, abs=1e-9)


def test_smooth_is_ultralytics_box_filter():
    # 1000 points and fraction 0.1: a window of round(200) // 2 + 1 = 101 points, padded with 50 copies of
    # each end. A one-point spike of 1 at index 100 becomes 1/101 over indices 50-150; a plateau of 0.8 over
    # 500-700 keeps 0.8 where the whole window fits (550-650), so the smoothed argmax moves from 100 to 550.
    curve = np.zeros(CURVE_POINTS)
    curve[100] = 1.0
    curve[500:701] = 0.8
    smoothed = smooth(curve)
    assert len(smoothed) == CURVE_POINTS
    assert curve.argmax() == 100 and smoothed.argmax() == 550
    assert smoothed[100] == pytest.approx(1 / 101) and smoothed[550] == pytest.approx(0.8)
    assert smoothed[549] == pytest.approx(0.8 * 100 / 101)
    assert smooth(np.full(CURVE_POINTS, 0.3)) == pytest.approx(np.full(CURVE_POINTS, 0.3))  # the padded ends too


def test_ap_per_class_takes_p_r_f1_where_the_smoothed_mean_f1_peaks():
    rng = np.random.default_rng(3)
    n = 300
    conf = rng.random(n)
    tp = rng.random((n, 10)) < conf[:, None]  # the surer, the likelier right: F1 peaks mid-range, jagged
    classes, targets = rng.integers(0, 3, n), rng.integers(0, 3, 200)
    plain = ap_per_class(tp, conf, classes, targets)
    smoothed = ap_per_class(tp, conf, classes, targets, smooth_f1=True)
    # the curves are the same; only the confidence at which P, R and F1 are read differs
    assert np.array_equal(plain.f1_curve, smoothed.f1_curve) and np.array_equal(plain.ap, smoothed.ap)
    assert plain.best_index == int(plain.f1_curve.mean(0).argmax())
    assert smoothed.best_index == int(smooth(plain.f1_curve.mean(0)).argmax()) != plain.best_index
    assert smoothed.mean_at_best()["f1"] == pytest.approx(smoothed.f1_curve[:, smoothed.best_index].mean())


def one_image_coco(tmp_path):
    """One 100x100 image, one ground truth: an L-shaped mask in the box (10, 10)-(60, 60); one prediction with
    that same box whose mask is the block the L leaves empty (mask IoU 0, box IoU 1)."""
    truth = np.zeros((100, 100), np.uint8)
    truth[10:60, 10:25] = 1  # the L: a 50 x 15 bar and a 15 x 35 foot
    truth[45:60, 25:60] = 1
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [10, 10, 50, 50],
                "area": float(truth.sum()),
                "segmentation": _rle(truth),
            }
        ],
    }
    corner = np.zeros((100, 100), np.uint8)
    corner[10:45, 25:60] = 1  # inside the box, outside the L
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9, "segmentation": _rle(corner)}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", results


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_the_mask_confusion_matrix_matches_boxes_as_ultralytics_segmentation_validator_does(tmp_path):
    # mask IoU 0: by masks, the truth is missed (background row) and the detection is a false alarm (background
    # column); Ultralytics matches the boxes (IoU 1 > 0.45) and counts a correct detection
    gt_file, results = one_image_coco(tmp_path)
    coco = COCO(str(gt_file))
    _, by_mask, _ = curves_matrix_dice(coco, results, "segm")
    _, by_box, _ = curves_matrix_dice(coco, results, "segm", ultralytics=True)
    assert by_mask.matrix.tolist() == [[0, 1], [1, 0]]
    assert by_box.matrix.tolist() == [[1, 0], [0, 0]]


def test_metrics_cli_ultralytics_flag_is_recorded_and_changes_only_what_it_should(tmp_path, capsys):
    gt_file, _ = one_image_coco(tmp_path)
    reports = {}
    for flag in ([], ["--ultralytics"]):
        out = tmp_path / ("ultra" if flag else "ours")
        assert cli_main(["metrics", str(gt_file), str(tmp_path / "results.json"), "--out", str(out), *flag]) == 0
        reports[bool(flag)] = json.loads((out / "metrics.json").read_text())
    assert reports[False]["ultralytics_compat"] is False and reports[True]["ultralytics_compat"] is True
    assert reports[False]["segm_map"] == reports[True]["segm_map"]  # COCO's numbers do not change
    assert reports[False]["confusion_matrix"] == [[0, 1], [1, 0]] and reports[True]["confusion_matrix"] == [
        [1, 0],
        [0, 0],
    ]
