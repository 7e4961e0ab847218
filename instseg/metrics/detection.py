"""Ultralytics-style detection metrics: confusion matrix, PR / P / R / F1-confidence curves, per-class AP,
mean P / R / F1 at the F1-optimal confidence, and Dice of matched instances.

Semantics follow ultralytics/utils/metrics.py as of 8.3 (ConfusionMatrix, ap_per_class, compute_ap,
match_predictions), re-implemented here:
  * true positives per IoU threshold 0.50:0.05:0.95, greedy by IoU, one detection per ground truth;
  * AP by 101-point interpolation of the precision envelope; curves sampled at 1000 confidences;
  * the confusion matrix is (nc + 1) x (nc + 1), rows = predicted class, columns = true class, the last
    row / column is background; detections below `conf` are ignored, matches need IoU > `iou`.
Where we differ by default: IoU is box or mask IoU (pycocotools, full resolution); after dropping duplicate
detections each ground truth keeps its highest-IoU detection (Ultralytics keeps the one with the lowest
index); the F1 curve is not smoothed before its maximum is taken (Ultralytics smooths it); a mask confusion
matrix matches masks (Ultralytics' segmentation validator matches boxes). `ultralytics=True` (config
metrics.ultralytics_compat, `instseg metrics --ultralytics`) does all three their way. Crowd ground truth is
left out in both (Ultralytics' COCO converter drops it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
CURVE_POINTS = 1000
F1_SMOOTHING = 0.1  # Ultralytics: the mean F1 curve is box-filtered over 2 x 0.1 of its points before its argmax


def greedy_matches(iou: np.ndarray, threshold: float, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(gt indices, prediction indices) of one-to-one pairs with IoU >= threshold (> when strict),
    taken by decreasing IoU. iou is [n_true, n_pred]; zero out pairs that may not match first."""
    gt_idx, pred_idx = np.nonzero(iou > threshold if strict else iou >= threshold)
    if len(gt_idx) == 0:
        return gt_idx, pred_idx
    order = np.argsort(-iou[gt_idx, pred_idx], kind="stable")
    gt_idx, pred_idx = gt_idx[order], pred_idx[order]
    _, first_pred = np.unique(pred_idx, return_index=True)
    keep = np.sort(first_pred)  # still by decreasing IoU
    gt_idx, pred_idx = gt_idx[keep], pred_idx[keep]
    _, first_gt = np.unique(gt_idx, return_index=True)
    return gt_idx[first_gt], pred_idx[first_gt]


def first_index_matches(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Ultralytics' match_predictions pairs: by decreasing IoU, each prediction keeps its best ground truth;
    then each ground truth keeps, of the predictions left, the one with the lowest index (not the highest IoU:
    the first np.unique re-sorts the pairs by prediction index)."""
    gt_idx, pred_idx = np.nonzero(iou >= threshold)
    if len(gt_idx) == 0:
        return gt_idx, pred_idx
    order = np.argsort(-iou[gt_idx, pred_idx], kind="stable")
    gt_idx, pred_idx = gt_idx[order], pred_idx[order]
    _, first_pred = np.unique(pred_idx, return_index=True)  # sorted by prediction index from here on
    gt_idx, pred_idx = gt_idx[first_pred], pred_idx[first_pred]
    _, first_gt = np.unique(gt_idx, return_index=True)
    return gt_idx[first_gt], pred_idx[first_gt]


def same_class_iou(iou: np.ndarray, pred_classes: np.ndarray, true_classes: np.ndarray) -> np.ndarray:
    return iou * (true_classes[:, None] == pred_classes[None, :]) if iou.size else iou


def match_predictions(
    pred_classes: np.ndarray,
    true_classes: np.ndarray,
    iou: np.ndarray,
    thresholds: np.ndarray = IOU_THRESHOLDS,
    ultralytics: bool = False,
) -> np.ndarray:
    """bool [n_pred, n_thresholds]: prediction i is a true positive (same class) at threshold t; `ultralytics`
    pairs them as Ultralytics does (first_index_matches)."""
    correct = np.zeros((len(pred_classes), len(thresholds)), dtype=bool)
    if len(pred_classes) == 0 or len(true_classes) == 0:
        return correct
    iou = same_class_iou(iou, pred_classes, true_classes)
    if ultralytics:
        for t, threshold in enumerate(thresholds):
            _, pred_idx = first_index_matches(iou, threshold)
            correct[pred_idx, t] = True
        return correct
    # greedy_matches at every threshold in one pass: the pairs at IoU >= t are a prefix of the pairs by decreasing
    # IoU, so each threshold keeps exactly the pairs greedy_matches keeps at the lowest one whose IoU reaches it
    gt_idx, pred_idx = greedy_matches(iou, float(np.min(thresholds)))
    reached = iou[gt_idx, pred_idx][:, None] >= np.asarray(thresholds)[None, :]
    correct[pred_idx] = reached
    return correct


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AP from a recall / precision sequence (by decreasing confidence): 101-point interpolation of the
    monotone precision envelope. Returns (ap, envelope precision, recall with sentinels)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    return float(np.trapezoid(np.interp(x, mrec, mpre), x)), mpre, mrec


@dataclass
class ClassCurves:
    """Everything ap_per_class computes, per class index in `classes`."""

    classes: np.ndarray  # class labels that have ground truth
    ap: np.ndarray  # [nc, 10] AP at IoU 0.50:0.95
    p_curve: np.ndarray  # [nc, 1000] precision against confidence
    r_curve: np.ndarray  # [nc, 1000] recall against confidence
    f1_curve: np.ndarray  # [nc, 1000]
    pr_curve: np.ndarray  # [nc, 1000] precision against recall at IoU 0.5
    confidence: np.ndarray = field(default_factory=lambda: np.linspace(0, 1, CURVE_POINTS))
    best_index: int = 0  # confidence index of the highest mean F1

    @property
    def best_confidence(self) -> float:
        return float(self.confidence[self.best_index])

    def mean_at_best(self) -> dict[str, float]:
        i = self.best_index
        return {
            "precision": float(self.p_curve[:, i].mean()) if len(self.classes) else 0.0,
            "recall": float(self.r_curve[:, i].mean()) if len(self.classes) else 0.0,
            "f1": float(self.f1_curve[:, i].mean()) if len(self.classes) else 0.0,
        }


def smooth(values: np.ndarray, fraction: float = F1_SMOOTHING) -> np.ndarray:
    """Ultralytics' box filter: the mean over an odd window of round(2 * fraction * len) // 2 * 2 + 1 points
    (101 of 1000), the ends padded with the first and last value; same length as `values`."""
    window = round(len(values) * fraction * 2) // 2 + 1
    pad = np.ones(window // 2)
    padded = np.concatenate((pad * values[0], values, pad * values[-1]))
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def ap_per_class(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    eps: float = 1e-16,
    smooth_f1: bool = False,
) -> ClassCurves:
    """tp [n_pred, 10] from match_predictions, with each prediction's confidence and class; target_cls
    holds the class of every ground truth instance. `smooth_f1` picks the best confidence on the smoothed
    mean F1 curve, as Ultralytics does (the curves themselves are not smoothed)."""
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    classes, n_labels = np.unique(target_cls, return_counts=True)
    nc = len(classes)
    x = np.linspace(0, 1, CURVE_POINTS)
    ap = np.zeros((nc, tp.shape[1]))
    p_curve, r_curve, pr_curve = (
        np.zeros((nc, CURVE_POINTS)),
        np.zeros((nc, CURVE_POINTS)),
        np.zeros((nc, CURVE_POINTS)),
    )
    for ci, c in enumerate(classes):
        mine = pred_cls == c
        if not mine.any():
            continue
        tpc = tp[mine].cumsum(0)
        fpc = (1 - tp[mine]).cumsum(0)
        recall = tpc / (n_labels[ci] + eps)
        precision = tpc / (tpc + fpc)
        # sampled at confidences x (confidence decreases along the sequence, hence the negation)
        r_curve[ci] = np.interp(-x, -conf[mine], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-x, -conf[mine], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0:
                pr_curve[ci] = np.interp(x, mrec, mpre)
    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    mean_f1 = f1_curve.mean(0) if nc else np.zeros(CURVE_POINTS)
    best = int((smooth(mean_f1) if smooth_f1 else mean_f1).argmax()) if nc else 0
    return ClassCurves(classes, ap, p_curve, r_curve, f1_curve, pr_curve, x, best)


class ConfusionMatrix:
    """(nc + 1) x (nc + 1) counts, rows predicted, columns true; index nc is background."""

    def __init__(self, nc: int, conf: float = 0.25, iou: float = 0.45) -> None:
        self.nc, self.conf, self.iou = nc, conf, iou
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def process(
        self, pred_classes: np.ndarray, pred_conf: np.ndarray, true_classes: np.ndarray, iou: np.ndarray
    ) -> None:
        """One image: classes as 0-based indices, iou [n_true, n_pred]."""
        keep = pred_conf > self.conf
        pred_classes, iou = (
            pred_classes[keep],
            iou[:, keep] if iou.size else np.zeros((len(true_classes), int(keep.sum()))),
        )
        if len(true_classes) == 0:
            np.add.at(self.matrix, (pred_classes, self.nc), 1)
            return
        if len(pred_classes) == 0:
            np.add.at(self.matrix, (self.nc, true_classes), 1)
            return
        gt_idx, pred_idx = greedy_matches(iou, self.iou, strict=True)  # any class: confusions count
        matched_gt = dict(zip(gt_idx.tolist(), pred_idx.tolist()))
        for g, true_class in enumerate(true_classes):
            if g in matched_gt:
                self.matrix[pred_classes[matched_gt[g]], true_class] += 1
            else:
                self.matrix[self.nc, true_class] += 1  # missed: background predicted
        matched_pred = set(matched_gt.values())
        for d, pred_class in enumerate(pred_classes):
            if d not in matched_pred:
                self.matrix[pred_class, self.nc] += 1  # false alarm on background

    def normalized(self) -> np.ndarray:
        """Each column divided by its total: the share of each true class predicted as each class."""
        return self.matrix / np.maximum(self.matrix.sum(0, keepdims=True), 1)


def matched_dice(
    pred_areas: np.ndarray,
    true_areas: np.ndarray,
    intersections: np.ndarray,
    iou: np.ndarray,
    pred_classes: np.ndarray,
    true_classes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(Dice 2|A∩B| / (|A| + |B|), true class) of each same-class pair matched at IoU 0.5 in one image."""
    if iou.size == 0:
        return np.zeros(0), np.zeros(0, dtype=int)
    gt_idx, pred_idx = greedy_matches(same_class_iou(iou, pred_classes, true_classes), 0.5)
    dice = 2 * intersections[gt_idx, pred_idx] / np.maximum(pred_areas[pred_idx] + true_areas[gt_idx], 1e-16)
    return dice, true_classes[gt_idx]


def summary(curves: ClassCurves, names: dict[int, str]) -> dict[str, Any]:
    """metrics.json fields from the curves: mean P / R / F1 at the best confidence and AP per class."""
    best = curves.mean_at_best()
    return {
        "precision": best["precision"],
        "recall": best["recall"],
        "f1": best["f1"],
        "best_confidence": curves.best_confidence,
        "per_class_ap": {
            names.get(int(c), str(int(c))): {"ap50": float(curves.ap[i, 0]), "ap50_95": float(curves.ap[i].mean())}
            for i, c in enumerate(curves.classes)
        },
    }
