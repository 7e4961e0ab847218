"""Evaluation benchmark: instseg's CocoEvaluator (process + compute, mask-to-RLE encoding included)
against the pycocotools path of torchvision's detection references, on the same model outputs.

Reference approach (as in torchvision references/detection/coco_eval.py): per image, boxes to lists,
every mask thresholded and RLE-encoded on its own, then pycocotools loadRes + COCOeval for bbox and
segm. The model outputs are made from COCO128-seg ground truth: every instance (its mask blurred into
probabilities, its box jittered) plus random false detections, as a Mask R-CNN returns them.

Then the scoring backends (metrics.backend) alone: pycocotools' COCOeval against faster-coco-eval on the same
results file, COCO128-seg repeated to --backend-images images with --backend-detections detections each
(every instance with a jittered box, the rest box-shaped false detections), all 12 stats compared.

    .venv/bin/python bench/eval.py [--shared ../shared] [--rounds 3] [--backend-images 1024]
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
from instseg.data.ground_truth import coco_from_dict
from instseg.metrics.coco_eval import CocoEvaluator
from instseg.metrics.coco_scoring import coco_stats, faster_ground_truth


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
        labels = torch.cat(
            [target["labels"], torch.randint(1, dataset.label_map.num_classes, (extra,), generator=generator)]
        )
        output = {
            "boxes": torch.cat([boxes, fake_boxes]),
            "labels": labels,
            "scores": torch.cat(
                [torch.rand(n, generator=generator) * 0.5 + 0.5, torch.rand(extra, generator=generator) * 0.6]
            ),
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
            rle = mask_utils.encode(np.array(mask[0, :, :, np.newaxis].numpy(), dtype=np.uint8, order="F"))[0]
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


def repeated_results(dataset: CocoInstanceDataset, images: int, per_image: int, seed: int = 0) -> tuple:
    """(ground truth, results) for the backend comparison: the dataset's images repeated under new ids."""
    rng = np.random.default_rng(seed)
    source = dataset.coco.dataset
    gt = {"images": [], "annotations": [], "categories": source["categories"]}
    results = []
    for n in range(images):
        image = dict(source["images"][n % len(source["images"])], id=n + 1)
        gt["images"].append(image)
        height, width = image["height"], image["width"]
        anns = [a for a in source["annotations"] if a["image_id"] == source["images"][n % len(source["images"])]["id"]]
        for ann in anns:
            gt["annotations"].append(dict(ann, id=len(gt["annotations"]) + 1, image_id=n + 1))
        boxes = [np.array(a["bbox"]) + rng.normal(0, 3, 4) for a in anns]
        categories = [a["category_id"] for a in anns]
        while len(boxes) < per_image:
            x, y = rng.uniform(0, width * 0.7), rng.uniform(0, height * 0.7)
            boxes.append(np.array([x, y, rng.uniform(10, 90), rng.uniform(10, 90)]))
            categories.append(int(rng.choice([c["id"] for c in source["categories"]])))
        for box, category in zip(boxes, categories):
            x, y, w, h = (float(v) for v in box)
            w, h = max(w, 1.0), max(h, 1.0)
            polygon = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            rle = mask_utils.merge(mask_utils.frPyObjects(polygon, height, width))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": n + 1,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "segmentation": rle,
                    "score": float(rng.uniform(0.05, 1.0)),
                }
            )
    return coco_from_dict(gt), results


def compare_backends(dataset: CocoInstanceDataset, images: int, per_image: int, rounds: int) -> bool:
    """Per-evaluation time of each backend (median of `rounds`, interleaved). Each backend's index of the
    ground truth is built before timing, as it is once per training run (pycocotools' COCO when the dataset
    loads, faster-coco-eval's copy at the first evaluation)."""
    gt, results = repeated_results(dataset, images, per_image)
    faster_ground_truth(gt)
    print(f"\nscoring backends, {images} images x {per_image} detections, median of {rounds}:")
    print(f"{'iou type':<10}{'pycocotools s':>15}{'faster s':>10}{'ratio':>8}  identical stats")
    identical = True
    for iou_type in ("bbox", "segm"):
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        times, stats = {"pycocotools": [], "faster": []}, {}
        for _ in range(rounds):
            for backend in times:
                copies = [{k: v for k, v in r.items() if k != drop} for r in results]  # loadRes writes into them
                start = time.perf_counter()
                stats[backend] = coco_stats(gt, copies, iou_type, backend=backend)
                times[backend].append(time.perf_counter() - start)
        times = {backend: statistics.median(values) for backend, values in times.items()}
        same = np.allclose(stats["pycocotools"], stats["faster"], rtol=0, atol=1e-12)
        identical &= same
        ratio = times["pycocotools"] / times["faster"]
        print(f"{iou_type:<10}{times['pycocotools']:>15.2f}{times['faster']:>10.2f}{ratio:>7.2f}x  {same}")
    return identical


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", default=str(Path(__file__).resolve().parents[2] / "shared"), help="the shared data folder"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--extra", type=int, default=20, help="false detections added per image")
    parser.add_argument("--backend-images", type=int, default=1024, help="images in the backend comparison (0: skip)")
    parser.add_argument("--backend-detections", type=int, default=100, help="detections per image there")
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
        backends_identical = (
            compare_backends(dataset, args.backend_images, args.backend_detections, args.rounds)
            if args.backend_images
            else True
        )
    identical = all(np.allclose(ours[t], reference[t], rtol=0, atol=1e-12) for t in ("bbox", "segm"))
    detections = sum(len(o["scores"]) for _, o in pairs)
    print(f"{len(pairs)} images, {detections} detections; bbox and segm stats identical: {identical}")
    print(f"  segm mAP {ours['segm'][0]:.4f}  bbox mAP {ours['bbox'][0]:.4f}")
    ours_s, ref_s = statistics.median(ours_times), statistics.median(ref_times)
    print(f"{'torchvision references path':<30}{ref_s:>8.2f} s")
    print(f"{'instseg CocoEvaluator':<30}{ours_s:>8.2f} s")
    print(f"ratio (reference time / instseg time): {ref_s / ours_s:.2f}x")
    return 0 if identical and backends_identical else 1


if __name__ == "__main__":
    sys.exit(main())
