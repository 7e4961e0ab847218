"""A dataset with COCO 2017's counts, for bench/scale.py: train2017 118,287 images / 859,348 polygon instances,
val2017 5,000 / 36,431, 80 classes, 640x480 images (hard links to a few real JPEGs: a few MB of disk), polygons
of 12-40 vertices, and a results file of 100 detections per val image with RLE masks (the ground truth's own
masks, shifted a little, then random shapes), as a model's predictions would be.

    .venv/bin/python bench/scale_data.py OUT [--scale 0.1] [--shared ../shared]

`--scale` multiplies the image and instance counts (0.1: a quick run). The same (scale, seed) gives the same
files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import orjson
from PIL import Image
from pycocotools import mask as mask_utils

WIDTH, HEIGHT = 640, 480
COUNTS = {"train2017": (118_287, 859_348), "val2017": (5_000, 36_431)}
CLASSES = 80
BASE_IMAGES = 8  # real JPEGs the images link to (ext4 allows 65,000 links per file)
DETECTIONS_PER_IMAGE = 100
RESULTS = "results_val2017.json"


def base_jpegs(shared: Path, folder: Path) -> list[Path]:
    """BASE_IMAGES real photos from coco128-seg, cropped and resized to WIDTHxHEIGHT."""
    source = sorted((shared / "datasets" / "coco128-seg" / "images" / "train2017").glob("*.jpg"))[:BASE_IMAGES]
    if not source:
        raise SystemExit(f"no coco128-seg images under {shared / 'datasets'}")
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for index, path in enumerate(source):
        target = folder / f"base{index}.jpg"
        with Image.open(path) as image:
            image.convert("RGB").resize((WIDTH, HEIGHT)).save(target, quality=90)
        made.append(target)
    return made


def polygons(rng: np.random.Generator, count: int) -> tuple[list[list[float]], np.ndarray, np.ndarray]:
    """`count` star-shaped polygons inside the image: (flat coordinate lists, xywh boxes, areas). Centres keep a
    few pixels from the border, so that no polygon is clipped to a sliver that covers no pixel."""
    vertices = rng.integers(12, 41, count)
    radius = rng.uniform(8, 120, count)
    cx = rng.uniform(4, WIDTH - 4, count)
    cy = rng.uniform(4, HEIGHT - 4, count)
    flat, boxes, areas = [], np.zeros((count, 4)), np.zeros(count)
    for index in range(count):
        n = int(vertices[index])
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = radius[index] * rng.uniform(0.5, 1.0, n)
        xs = np.clip(cx[index] + r * np.cos(angles), 0, WIDTH - 0.01).round(2)
        ys = np.clip(cy[index] + r * np.sin(angles), 0, HEIGHT - 0.01).round(2)
        coords = np.empty(2 * n)
        coords[0::2], coords[1::2] = xs, ys
        flat.append(coords.tolist())
        x0, y0 = xs.min(), ys.min()
        boxes[index] = (x0, y0, xs.max() - x0, ys.max() - y0)
        areas[index] = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
    return flat, boxes.round(2), areas.round(2)


def make_split(root: Path, split: str, images: int, instances: int, bases: list[Path], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(images):
        name = f"{index + 1:012d}.jpg"
        link = folder / name
        if not link.exists():
            link.hardlink_to(bases[index % len(bases)])
        records.append({"id": index + 1, "file_name": name, "width": WIDTH, "height": HEIGHT})
    owner = np.sort(rng.integers(1, images + 1, instances))
    categories = rng.integers(1, CLASSES + 1, instances)
    flat, boxes, areas = polygons(rng, instances)
    annotations = [
        {
            "id": index + 1,
            "image_id": int(owner[index]),
            "category_id": int(categories[index]),
            "segmentation": [flat[index]],
            "area": float(areas[index]),
            "bbox": boxes[index].tolist(),
            "iscrowd": 0,
        }
        for index in range(instances)
    ]
    coco = {
        "info": {"description": "instseg bench/scale_data.py: COCO 2017 counts"},
        "images": records,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, CLASSES + 1)],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_bytes(orjson.dumps(coco))
    return coco


def make_results(coco: dict, path: Path, seed: int) -> int:
    """DETECTIONS_PER_IMAGE per image: each ground-truth mask shifted by a few pixels, then random shapes."""
    rng = np.random.default_rng(seed)
    pool_flat, _, _ = polygons(rng, 2000)
    pool = mask_utils.frPyObjects(pool_flat, HEIGHT, WIDTH)
    pool_boxes = mask_utils.toBbox(pool).tolist()
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    results = []
    for image in coco["images"]:
        own = by_image.get(image["id"], [])[:DETECTIONS_PER_IMAGE]
        shifted = []
        for ann in own:
            dx, dy = rng.uniform(-3, 3, 2)
            poly = np.asarray(ann["segmentation"][0])
            poly[0::2] = np.clip(poly[0::2] + dx, 0, WIDTH - 0.01)
            poly[1::2] = np.clip(poly[1::2] + dy, 0, HEIGHT - 0.01)
            shifted.append(poly.tolist())
        rles = mask_utils.frPyObjects(shifted, HEIGHT, WIDTH) if shifted else []
        picks = rng.integers(0, len(pool), DETECTIONS_PER_IMAGE - len(own))
        scores = np.sort(rng.uniform(0.05, 1.0, DETECTIONS_PER_IMAGE))[::-1]
        for rank, (rle, category) in enumerate(
            [(rle, ann["category_id"]) for rle, ann in zip(rles, own)]
            + [(pool[p], int(rng.integers(1, CLASSES + 1))) for p in picks]
        ):
            box = mask_utils.toBbox(rle).tolist() if rank < len(own) else pool_boxes[picks[rank - len(own)]]
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": category,
                    "bbox": [round(v, 2) for v in box],
                    "score": round(float(scores[rank]), 5),
                    "segmentation": {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")},
                }
            )
    path.write_bytes(orjson.dumps(results))
    return len(results)


def generate(root: Path, scale: float = 1.0, shared: Path | None = None, seed: int = 0) -> Path:
    """The dataset at `root` (made once: an existing one of the same scale is reused); returns the results file."""
    stamp = root / f".scale-{scale}-seed-{seed}"
    results = root / RESULTS
    if stamp.is_file() and results.is_file():
        return results
    shared = shared or Path(__file__).resolve().parents[2] / "shared"
    bases = base_jpegs(shared, root / "base")
    val = None
    for offset, (split, (images, instances)) in enumerate(COUNTS.items()):
        started = time.perf_counter()
        coco = make_split(root, split, max(2, round(images * scale)), max(2, round(instances * scale)), bases, seed)
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} instances "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        val = coco if split == "val2017" else val
        del coco
    started = time.perf_counter()
    count = make_results(val, results, seed + 1)
    print(f"{RESULTS}: {count} detections ({time.perf_counter() - started:.0f} s)", flush=True)
    stamp.write_text("")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (reused when it holds this scale already)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of COCO 2017's counts")
    parser.add_argument("--shared", type=Path, default=None, help="the shared folder with datasets/coco128-seg")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.out, args.scale, args.shared, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
