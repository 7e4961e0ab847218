"""`instseg metrics GT.json RESULTS.json`: COCO stats plus Ultralytics-style curves, confusion matrix and
Dice for any COCO results file, written as metrics.json and plots. Training uses the same functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instseg.data.files import atomic_write_json
from instseg.data.ground_truth import LabelMap
from instseg.data.rle import to_rle
from instseg.metrics.coco_scoring import DEFAULT_BACKEND, Backend, coco_stats, results_for
from instseg.metrics.detection import (
    ClassCurves,
    ConfusionMatrix,
    ap_per_class,
    match_predictions,
    matched_dice,
    summary,
)
from instseg.metrics.fitness import fitness
from instseg.metrics.names import COCO_STAT_NAMES, FITNESS, val_key

OVERLAY_GRID = "val_predictions.png"  # after the last epoch (every train.plot_every epochs: val_predictions_epochN.png)


def _iou_and_areas(
    coco_gt: COCO, gts: list[dict], dts: list[dict], iou_type: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU [n_true, n_pred] and the areas of ground truth and predictions (mask or box)."""
    if iou_type == "segm":
        gt_items = [coco_gt.annToRLE(g) for g in gts]
        # compressed RLE (nearly every results file) goes to pycocotools as it is; run-length lists are compressed
        dt_items = [
            d["segmentation"]
            if isinstance(d["segmentation"]["counts"], (str, bytes))
            else to_rle(d["segmentation"], *d["segmentation"]["size"])
            for d in dts
        ]
        gt_areas = np.asarray(mask_utils.area(gt_items) if gt_items else [], dtype=float)
        dt_areas = np.asarray(mask_utils.area(dt_items) if dt_items else [], dtype=float)
    else:
        gt_items, dt_items = [g["bbox"] for g in gts], [d["bbox"] for d in dts]
        gt_areas = np.array([b[2] * b[3] for b in gt_items], dtype=float)
        dt_areas = np.array([b[2] * b[3] for b in dt_items], dtype=float)
    if not gts or not dts:
        return np.zeros((len(gts), len(dts))), gt_areas, dt_areas
    iou = np.asarray(mask_utils.iou(dt_items, gt_items, [0] * len(gt_items)), dtype=float).T
    return iou, gt_areas, dt_areas


def curves_matrix_dice(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_type: str,
    conf: float = 0.25,
    iou_thres: float = 0.45,
    ultralytics: bool = False,
) -> tuple[ClassCurves, ConfusionMatrix, dict[int, list[float]]]:
    """Curves, confusion matrix and Dice per class; `ultralytics` matches, smooths and builds the confusion matrix
    (on box IoU, also for masks) as Ultralytics 8.x does (instseg.metrics.detection)."""
    cat_ids = sorted(coco_gt.getCatIds())
    index = {cat: i for i, cat in enumerate(cat_ids)}
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    matrix = ConfusionMatrix(len(cat_ids), conf=conf, iou=iou_thres)
    tps, confs, pred_cls, target_cls = [], [], [], []
    dice: dict[int, list[float]] = {}
    for image_id in sorted(coco_gt.getImgIds()):
        gts = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        dts = by_image.get(image_id, [])
        iou, gt_areas, dt_areas = _iou_and_areas(coco_gt, gts, dts, iou_type)
        true_classes = np.array([index[g["category_id"]] for g in gts], dtype=int)
        pred_classes = np.array([index[d["category_id"]] for d in dts], dtype=int)
        scores = np.array([d["score"] for d in dts], dtype=float)
        tps.append(match_predictions(pred_classes, true_classes, iou, ultralytics=ultralytics))
        confs.append(scores)
        pred_cls.append(pred_classes)
        target_cls.append(true_classes)
        box_iou = _iou_and_areas(coco_gt, gts, dts, "bbox")[0] if ultralytics and iou_type == "segm" else iou
        matrix.process(pred_classes, scores, true_classes, box_iou)
        # |A∩B| from IoU: I = IoU (|A| + |B|) / (1 + IoU)
        inter = iou * (gt_areas[:, None] + dt_areas[None, :]) / (1 + iou) if iou.size else iou
        values, classes = matched_dice(dt_areas, gt_areas, inter, iou, pred_classes, true_classes)
        for value, cls in zip(values.tolist(), classes.tolist()):
            dice.setdefault(cls, []).append(value)

    def joined(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        return np.concatenate(parts) if parts else empty

    curves = ap_per_class(
        joined(tps, np.zeros((0, 10), bool)),
        joined(confs, np.zeros(0)),
        joined(pred_cls, np.zeros(0, int)),
        joined(target_cls, np.zeros(0, int)),
        smooth_f1=ultralytics,
    )
    return curves, matrix, dice


def score_results(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_type: str,
    fitness_weights: Mapping[str, float],
    conf: float = 0.25,
    iou_thres: float = 0.45,
    backend: Backend = DEFAULT_BACKEND,
    ultralytics: bool = False,
) -> tuple[dict[str, Any], ClassCurves, ConfusionMatrix]:
    """metrics.json content: the 12 COCO stats, P / R / F1 at the best confidence, per-class AP, Dice,
    fitness (over this IoU type's metrics) and the confusion matrix (`ultralytics`: see curves_matrix_dice)."""
    stats = coco_stats(coco_gt, results_for(results, iou_type), iou_type, coco_gt.getImgIds(), backend)
    coco = {val_key(iou_type, name): value for name, value in zip(COCO_STAT_NAMES, stats)}
    curves, matrix, dice = curves_matrix_dice(coco_gt, results, iou_type, conf, iou_thres, ultralytics)
    names = {i: coco_gt.cats[c]["name"] for i, c in enumerate(sorted(coco_gt.getCatIds()))}
    weights = {k: w for k, w in fitness_weights.items() if k in coco}
    all_dice = [v for values in dice.values() for v in values]
    report = {
        "iou_type": iou_type,
        **{f"{iou_type}_{name}": value for name, value in zip(COCO_STAT_NAMES, stats)},
        **summary(curves, names),
        "dice": float(np.mean(all_dice)) if all_dice else 0.0,
        "per_class_dice": {names[c]: float(np.mean(v)) for c, v in sorted(dice.items())},
        FITNESS: fitness(coco, weights),
        "fitness_weights": weights,
        "confusion_matrix": matrix.matrix.tolist(),
        "confusion_matrix_labels": [names[i] for i in range(len(names))] + ["background"],
        "confusion_conf": conf,
        "confusion_iou": iou_thres,
        "ultralytics_compat": ultralytics,
    }
    return report, curves, matrix


def curve_metrics(
    coco_gt: COCO, results: list[dict[str, Any]], iou_type: str, ultralytics: bool = False
) -> tuple[dict[str, float], ClassCurves, ConfusionMatrix]:
    """Per-epoch `val/{iou_type}_precision|recall|f1|dice` (at the F1-optimal confidence) and what plots need."""
    only = results_for(results, iou_type)
    curves, matrix, dice = curves_matrix_dice(coco_gt, only, iou_type, ultralytics=ultralytics)
    best = curves.mean_at_best()
    all_dice = [v for values in dice.values() for v in values]
    metrics = {val_key(iou_type, key): value for key, value in best.items()}
    metrics[val_key(iou_type, "dice")] = float(np.mean(all_dice)) if all_dice else 0.0
    return metrics, curves, matrix


def _drawable_results(image: Any, results: list[dict[str, Any]], label_map: LabelMap, score: float) -> dict[str, Any]:
    """An image's COCO results scoring at least `score` as draw_detections takes them."""
    import torch

    kept = [d for d in results if d["score"] >= score]
    masks = [mask_utils.decode(to_rle(d["segmentation"], *d["segmentation"]["size"])) for d in kept]
    no_masks = torch.zeros((0, *image.shape[1:]), dtype=torch.bool)
    return {
        "masks": torch.from_numpy(np.stack(masks)).bool() if masks else no_masks,
        "boxes": torch.tensor(
            [[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]] for d in kept]
        ).reshape(-1, 4),
        "classes": [label_map.label(d["category_id"]) - 1 for d in kept],
        "scores": [d["score"] for d in kept],
    }


def write_overlay_grid(
    path: Path, samples: list[tuple[Any, dict[str, Any], list[dict[str, Any]]]], label_map: LabelMap, score: float
) -> Path:
    """Validation images, ground truth beside predictions (samples: (uint8 image, its dataset target, its COCO
    results); detections below `score` are not drawn)."""
    from instseg.metrics.plots import plot_overlays, target_drawable

    drawn = [
        (image, target_drawable(target), _drawable_results(image, results, label_map, score))
        for image, target, results in samples
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_overlays(drawn, list(label_map.names), path)


def write_training_plots(
    out: Path,
    curves: ClassCurves,
    matrix: ConfusionMatrix,
    label_map: LabelMap,
    loss_history: dict[str, list[tuple[int, float]]],
    samples: list[tuple[Any, dict[str, Any], list[dict[str, Any]]]],
    score: float,
    coco_map50: float | None = None,
) -> list[Path]:
    """Confusion matrices, PR / P / R / F1 curves (the PR legend also gives COCO's mAP50 when known), loss curves
    and the grid of validation images (write_overlay_grid)."""
    from instseg.metrics.plots import plot_confusion_matrix, plot_curves, plot_losses

    out.mkdir(parents=True, exist_ok=True)
    names = list(label_map.names)
    return [
        *plot_confusion_matrix(matrix, names, out),
        *plot_curves(curves, names, out, coco_map50),
        plot_losses(loss_history, out),
        write_overlay_grid(out / OVERLAY_GRID, samples, label_map, score),
    ]


def write_report(
    out: Path, report: dict[str, Any], curves: ClassCurves, matrix: ConfusionMatrix, names: list[str]
) -> list[Path]:
    from instseg.metrics.plots import plot_confusion_matrix, plot_curves

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", report, indent=2)
    coco_map50 = report.get(f"{report['iou_type']}_map50")
    return [
        out / "metrics.json",
        *plot_confusion_matrix(matrix, names, out),
        *plot_curves(curves, names, out, coco_map50),
    ]
