"""Validation of COCO annotations and images: the one set of rules behind `instseg data check` and
the training policy `data.on_invalid` (error: stop with the problems; skip: drop what is bad).

Each problem has a stable `kind` (the reason counted when skipping) and a location a person can
open: the JSON file with image / annotation ids, or the YOLO label file and line.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pycocotools import mask as mask_utils

from instseg.data.formats import SOURCE_KEY, SplitData
from instseg.data.schema import is_integer, is_number, is_rle_size, rle_runs

# kinds that make an annotation unusable for training (the image itself stays)
ANNOTATION_KINDS = (
    "bad_label_line",
    "bad_segmentation",
    "bad_area",
    "unknown_category",
    "empty_segmentation",
    "polygon_too_few_points",
    "polygon_odd_coordinates",
    "coordinate_not_finite",
    "coordinate_negative",
    "coordinate_outside_image",
    "zero_area_box",
    "zero_area_mask",
)


@dataclass(frozen=True)
class Problem:
    kind: str
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind:<26} {self.location}: {self.message}"


def _numbers_ok(values: list[Any]) -> bool:
    return all(is_number(v) for v in values)


def annotation_problems(ann: dict[str, Any], width: int, height: int, category_ids: set[int]) -> list[tuple[str, str]]:
    """(kind, message) for everything wrong with one annotation of an image of width x height."""
    if "instseg_problem" in ann:
        return [("bad_label_line", ann["instseg_problem"])]
    problems: list[tuple[str, str]] = []
    category = ann.get("category_id")
    if not is_integer(category) or category not in category_ids:
        problems.append(("unknown_category", f"category_id {json.dumps(category)[:40]} is not in categories"))
    if not is_number(ann.get("area")) or not math.isfinite(ann.get("area")):
        problems.append(("bad_area", f"area {json.dumps(ann.get('area'))[:40]} is not a finite number"))
    seg = ann.get("segmentation")
    if isinstance(seg, dict):  # RLE
        problems += rle_problems(seg, width, height)
        return problems + box_problems(ann.get("bbox"), problems)
    if not seg:
        return problems + [("empty_segmentation", "segmentation is missing or empty")]
    if not isinstance(seg, list) or not all(isinstance(poly, list) for poly in seg):
        shape = "a flat list of numbers" if isinstance(seg, list) and _numbers_ok(seg) else json.dumps(seg)[:40]
        message = f"segmentation must be polygons [[x1, y1, x2, y2, ...], ...] or an RLE object, not {shape}"
        return problems + [("bad_segmentation", message)]
    usable = []
    for index, poly in enumerate(seg):
        where = f"polygon {index}" if len(seg) > 1 else "polygon"
        if not _numbers_ok(poly):
            problems.append(("coordinate_not_finite", f"{where} has non-numeric coordinates"))
            continue
        if len(poly) % 2:
            problems.append(("polygon_odd_coordinates", f"{where} has an odd number of coordinates ({len(poly)})"))
            continue
        if len(poly) < 6:
            problems.append(("polygon_too_few_points", f"{where} has {len(poly) // 2} points (at least 3 needed)"))
            continue
        if not all(math.isfinite(v) for v in poly):
            problems.append(("coordinate_not_finite", f"{where} has NaN or infinite coordinates"))
            continue
        if min(poly) < 0:
            problems.append(("coordinate_negative", f"{where} has negative coordinates (min {min(poly):.2f})"))
            continue
        xs, ys = poly[0::2], poly[1::2]
        if width and height and (max(xs) > width or max(ys) > height):
            reach = f"({max(xs):.1f}, {max(ys):.1f})"
            problems.append(("coordinate_outside_image", f"{where} reaches {reach} outside the {width}x{height} image"))
            continue
        usable.append(poly)
    if usable and len(usable) == len(seg) and width and height:
        if mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(usable, height, width))) == 0:
            problems.append(("zero_area_mask", "polygon covers no pixel"))
    return problems + box_problems(ann.get("bbox"), problems)


def box_problems(box: Any, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A bbox must be 4 finite numbers with a width and height (its absence counts only on an otherwise
    sound annotation: one problem per annotation is enough to point at it)."""
    problems: list[tuple[str, str]] = []
    if isinstance(box, list) and len(box) == 4 and _numbers_ok(box) and all(math.isfinite(v) for v in box):
        if box[2] <= 0 or box[3] <= 0:
            problems.append(("zero_area_box", f"bbox {box} has zero width or height"))
    elif not found:
        problems.append(("coordinate_not_finite", f"bbox {box} is not 4 finite numbers"))
    return problems


def rle_problems(rle: dict[str, Any], width: int, height: int) -> list[tuple[str, str]]:
    """An RLE's size must be the image's and its run lengths must cover exactly its pixels: pycocotools
    reads past the end of a short one instead of failing."""
    size, counts = rle.get("size"), rle.get("counts")
    if not is_rle_size(size):
        return [("bad_segmentation", f"RLE needs 'size': [height, width] (got {json.dumps(size)[:40]})")]
    if width and height and size != [height, width]:
        return [("coordinate_outside_image", f"RLE size {size} differs from the image's [{height}, {width}]")]
    runs = rle_runs(counts)
    if runs is None and not isinstance(counts, str):
        shown = json.dumps(counts)[:40]
        return [("bad_segmentation", f"RLE 'counts' must be a compressed string or a list of run lengths ({shown})")]
    if runs is None or sum(runs) != size[0] * size[1]:
        return [("bad_segmentation", f"RLE counts do not cover the {size[0]}x{size[1]} pixels of its size")]
    if sum(runs[1::2]) == 0:
        return [("zero_area_mask", "RLE mask has no pixels")]
    return []


def _ann_location(source: str, ann: dict[str, Any]) -> str:
    return ann.get(SOURCE_KEY) or f"{source}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"


def validate_annotations(coco: dict[str, Any], source: str) -> tuple[list[Problem], set[int]]:
    """Problems of the annotations of one COCO dict (no image is opened) and the positions of the bad
    annotations in coco["annotations"]."""
    images = {}
    problems: list[Problem] = []
    for kind, key, items in (
        ("duplicate_image_id", "image", coco["images"]),
        ("duplicate_category_id", "category", coco["categories"]),
    ):
        seen: set[Any] = set()
        for item in items:
            if item.get("id") in seen:
                problems.append(Problem(kind, source, f"{key} id {item.get('id')} appears more than once"))
            seen.add(item.get("id"))
    for image in coco["images"]:
        images.setdefault(image.get("id"), image)
    category_ids = {c.get("id") for c in coco["categories"]}
    bad: set[int] = set()
    seen_ann: set[Any] = set()
    for position, ann in enumerate(coco["annotations"]):
        location = _ann_location(source, ann)
        if ann.get("id") in seen_ann:
            problems.append(
                Problem("duplicate_annotation_id", location, f"annotation id {ann.get('id')} appears more than once")
            )
            bad.add(position)
        seen_ann.add(ann.get("id"))
        image = images.get(ann.get("image_id"))
        if image is None:
            problems.append(Problem("unknown_image", location, f"image_id {ann.get('image_id')} is not in images"))
            bad.add(position)
            continue
        for kind, message in annotation_problems(
            ann, int(image.get("width") or 0), int(image.get("height") or 0), category_ids
        ):
            problems.append(Problem(kind, location, message))
            bad.add(position)
    return problems, bad


def image_problems(path: Path, width: int, height: int, location: str) -> list[Problem]:
    """Missing, unreadable or truncated files, and a size that differs from the JSON's."""
    if not path.is_file():
        return [Problem("image_missing", location, f"{path} does not exist")]
    try:
        with Image.open(path) as image:
            image.load()  # decodes fully: a truncated file raises here
            size = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return [Problem("image_unreadable", location, f"{path}: {str(exc).splitlines()[0]}")]
    if width and height and size != (width, height):
        return [
            Problem("image_size_mismatch", location, f"{path} is {size[0]}x{size[1]}, the JSON says {width}x{height}")
        ]
    return []


def check_split(data: SplitData, source: str) -> list[Problem]:
    """Every problem of one split: annotations, images and (YOLO) label/image pairing."""
    problems, _ = validate_annotations(data.coco, source)
    for image in data.coco["images"]:
        path = data.image_files.get(image.get("id"))
        location = f"{source}: image id {image.get('id')} ({image.get('file_name')})"
        if image.get("id") in data.outside:
            why = "file_name must be a relative path inside the image folder (it is absolute, leaves it, or is no path)"
            problems.append(Problem("image_outside_dataset", location, why))
            continue
        if path is None:
            problems.append(Problem("image_missing", location, "no file_name"))
            continue
        problems.extend(image_problems(path, int(image.get("width") or 0), int(image.get("height") or 0), location))
    problems.extend(
        Problem("label_without_image", str(p), "label file has no image of the same name") for p in data.orphan_labels
    )
    problems.extend(
        Problem("image_without_label", str(p), "image has no label file (a background image?)")
        for p in data.unlabeled_images
    )
    return problems


def summarise_split(data: SplitData) -> dict[str, Any]:
    coco = data.coco
    names = {c.get("id"): c.get("name") for c in coco["categories"]}
    categories = (a.get("category_id") for a in coco["annotations"])
    per_class = Counter(names.get(c, str(c)) if is_integer(c) else str(c) for c in categories)
    with_instances = {a.get("image_id") for a in coco["annotations"]}
    widths = sorted(int(i.get("width") or 0) for i in coco["images"])
    heights = sorted(int(i.get("height") or 0) for i in coco["images"])

    def stats(values: list[int]) -> dict[str, int]:
        return {"min": values[0], "median": values[len(values) // 2], "max": values[-1]} if values else {}

    return {
        "images": len(coco["images"]),
        "instances": len(coco["annotations"]),
        "classes": len(per_class),
        "images_without_instances": sum(1 for i in coco["images"] if i.get("id") not in with_instances),
        "instances_per_class": dict(per_class.most_common()),
        "width": stats(widths),
        "height": stats(heights),
    }
