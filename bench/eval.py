"""Evaluation benchmark: instseg's CocoEvaluator (process + compute, mask-to-RLE encoding included)
against the pycocotools path of torchvision's detection references, on the same model outputs.

Reference approach (as in torchvision references/detection/coco_eval.py): per image, boxes to lists,
every mask thresholded and RLE-encoded on its own, then pycocotools loadRes + COCOeval for bbox and
segm. The model outputs are made from COCO128-seg ground truth: every instance (its mask blurred into
probabilities, its box jittered) plus random false detections, as a Mask R-CNN returns them.

    .venv/bin/python bench/eval.py [--shared ../shared] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from instseg.data.coco import CocoInstanceDataset
from instseg.data.formats import convert
from instseg.metrics.coco_eval import CocoEvaluator


def make_outputs(dataset: CocoInstanceDataset, extra: int, seed: int = 0) -> list[tuple[dict, dict]]:
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        height, width = image.shape[-2:]
        n = len(target["labels"])
        boxes = target["boxes"] + torch.randn(n, 4, generator=generator) * 3
        masks = target["masks"][:, None].float() * 0.9 + torch.rand(n, 1, height, width, generator=generator) * 0.2
        fake_xy = torch.rand(extra, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        fake_boxes = torch.cat([fake_xy, fake_xy + torch.rand(extra, 2, generator=generator) * 80 + 10], 1)
        fake_masks = torch.zeros(extra, 1, height, width)
        for i, (x1, y1, x2, y2) in enumerate(fake_boxes.long().tolist()):
            fake_masks[i, 0, y1:y2, x1:x2] = 0.8
        labels = torch.cat([target["labels"], torch.randint(1, dataset.label_map.num_classes, (extra,), generator=generator)])
        output = {
            "boxes": torch.cat([boxes, fake_boxes]),
            "labels": labels,
            "scores": torch.cat([torch.rand(n, generator=generator) * 0.5 + 0.5, torch.rand(extra, generator=generator) * 0.6]),
            "masks": torch.cat([masks, fake_masks]),
        }
        pairs.append(({"image_id": target["image_id"]}, output))
    return pairs


def reference_evaluate(dataset: CocoInstanceDataset, pairs: list[tuple[dict, dict]]) -> dict[str, list[float]]:
    results = {"bbox": [], "segm": []}
    for target, output in pairs:
        image_id = target["image_id"]
        boxes = output["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        scores, labels = output["scores"].tolist(), output["labels"].tolist()
        categories = [dataset.label_map.category_id(label) for label in labels]
        for box, score, category in zip(boxes.tolist(), scores, categories):
            results["bbox"].append({"image_id": image_id, "category_id": category, "bbox": box, "score": score})
        masks = output["masks"] > 0.5
        for mask, score, category in zip(masks, scores, categories):
            rle = mask_utils.encode(np.array(mask[0, :, :, np.newaxis], dtype=np.uint8, order="F"))[0]
            rle["counts"] = rle["counts"].decode("utf-8")
            results["segm"].append({"image_id": image_id, "category_id": category, "segmentation": rle, "score": score})
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for iou_type, dets in results.items():
            evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(dets), iouType=iou_type)
            evaluator.params.imgIds = sorted(t["image_id"] for t, _ in pairs)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[iou_type] = [float(s) for s in evaluator.stats]
    return stats


def ours_evaluate(dataset: CocoInstanceDataset, pairs: list[tuple[dict, dict]]) -> dict[str, list[float]]:
    evaluator = CocoEvaluator(dataset.coco, dataset.label_map)
    for target, output in pairs:
        evaluator.process([target], [output])
    metrics = evaluator.compute()
    return {t: [v for k, v in metrics.items() if k.startswith(f"val/{t}_")] for t in ("bbox", "segm")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"), help="the shared data folder")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--extra", type=int, default=20, help="false detections added per image")
    args = parser.parse_args()
    source = Path(args.shared) / "datasets" / "coco128-seg"
    if not source.is_dir():
        print(f"coco128-seg not found at {source}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        convert(source, Path(tmp) / "coco128")
        dataset = CocoInstanceDataset(Path(tmp) / "coco128", "train2017")
        pairs = make_outputs(dataset, args.extra)
        ours_times, ref_times = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            ours = ours_evaluate(dataset, pairs)
            ours_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            reference = reference_evaluate(dataset, pairs)
            ref_times.append(time.perf_counter() - start)
    identical = all(np.array_equal(ours[t], reference[t]) for t in ("bbox", "segm"))
    detections = sum(len(o["scores"]) for _, o in pairs)
    print(f"{len(pairs)} images, {detections} detections; bbox and segm stats identical: {identical}")
    print(f"  segm mAP {ours['segm'][0]:.4f}  bbox mAP {ours['bbox'][0]:.4f}")
    ours_s, ref_s = statistics.median(ours_times), statistics.median(ref_times)
    print(f"{'torchvision references path':<30}{ref_s:>8.2f} s")
    print(f"{'instseg CocoEvaluator':<30}{ours_s:>8.2f} s")
    print(f"ratio (reference time / instseg time): {ref_s / ours_s:.2f}x")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
