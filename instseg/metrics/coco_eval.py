"""COCO bbox + segm evaluation with pycocotools, in detectron2's reset / process / compute shape."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable

import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg.data.coco import LabelMap
from instseg.metrics.names import COCO_STAT_NAMES, val_key

IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5


def to_coco_results(image_id: int, output: dict[str, torch.Tensor], label_map: LabelMap) -> list[dict[str, Any]]:
    """One image's model output -> COCO results entries (xywh boxes, compressed-RLE masks)."""
    boxes = output["boxes"].detach().cpu().numpy()
    scores = output["scores"].detach().cpu().numpy()
    labels = output["labels"].detach().cpu().numpy()
    masks = None
    if "masks" in output:
        # pycocotools wants [H, W, N] in column-major order, which is [N, W, H] in row-major order: one
        # uint8 transposing copy in torch, then a zero-copy numpy view that is already Fortran-ordered
        binary = (output["masks"].detach()[:, 0] > MASK_THRESHOLD).transpose(1, 2).contiguous().cpu()
        fortran = binary.view(torch.uint8).numpy().transpose(2, 1, 0)
        masks = mask_utils.encode(fortran) if len(binary) else []
    results = []
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        entry: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": label_map.category_id(int(labels[i])),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[i]),
        }
        if masks is not None:
            rle = masks[i]
            entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.append(entry)
    return results


def results_for(results: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Fresh dicts holding only the keys of one IoU type, as pycocotools expects.

    loadRes takes its bbox branch (box area, not mask area) whenever "bbox" is present, and it
    writes into the dicts it is given, so each evaluation gets its own copies."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in results]


def coco_stats(coco_gt: COCO, results: list[dict[str, Any]], iou_type: str, image_ids: Iterable[int] | None = None) -> list[float]:
    """The 12 COCOeval stats; all zeros when there are no detections (loadRes refuses an empty list)."""
    if not results:
        return [0.0] * len(COCO_STAT_NAMES)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


class CocoEvaluator:
    """Collects predictions image by image, then computes `val/{bbox,segm}_{stat}` metrics."""

    def __init__(self, coco_gt: COCO, label_map: LabelMap, iou_types: tuple[str, ...] = IOU_TYPES) -> None:
        self.coco_gt = coco_gt
        self.label_map = label_map
        self.iou_types = iou_types
        self.reset()

    def reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()

    def process(self, targets: list[dict[str, Any]], outputs: list[dict[str, torch.Tensor]]) -> None:
        for target, output in zip(targets, outputs):
            image_id = int(target["image_id"])
            self.image_ids.add(image_id)
            self.results.extend(to_coco_results(image_id, output, self.label_map))

    def merge(self, parts: list[tuple[list[dict[str, Any]], set[int]]]) -> None:
        """Take the (results, image ids) of every rank, e.g. from torch.distributed.all_gather_object."""
        self.reset()
        for results, image_ids in parts:
            self.results.extend(results)
            self.image_ids |= set(image_ids)

    def state(self) -> tuple[list[dict[str, Any]], set[int]]:
        return self.results, self.image_ids

    def compute(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for iou_type in self.iou_types:
            stats = coco_stats(self.coco_gt, results_for(self.results, iou_type), iou_type, self.image_ids)
            metrics.update({val_key(iou_type, name): value for name, value in zip(COCO_STAT_NAMES, stats)})
        return metrics
