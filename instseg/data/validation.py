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
from typing import Any, Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from instseg.data.formats import SOURCE_KEY, SplitData
from instseg.data.parallel import map_chunks
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


_PLAIN_NUMBERS = {int, float}


def _numbers_ok(values: list[Any]) -> bool:
    # the set of types first: one pass in C for the lists of plain floats that make up nearly every file
    return set(map(type, values)) <= _PLAIN_NUMBERS or all(is_number(v) for v in values)


def _all_finite(values: list[Any]) -> bool:
    # a finite sum means every value is finite (NaN and infinity carry through a sum): one pass in C, mostly
    try:
        if math.isfinite(sum(values)):
            return True
    except OverflowError:
        pass
    return all(math.isfinite(v) for v in values)


def annotation_problems(ann: dict[str, Any], width: int, height: int, category_ids: set[int]) -> list[tuple[str, str]]:
    """(kind, message) for everything wrong with one annotation of an image of width x height."""
    return checked_annotations([ann], [(width, height)], category_ids)[0][0]


def checked_annotations(
    anns: list[dict[str, Any]], sizes: list[tuple[int, int]], category_ids: set[Any]
) -> list[tuple[list[tuple[str, str]], dict[str, Any] | None]]:
    """(annotation_problems, the polygons' full-image RLE when the check rasterised them, else None) of each
    annotation (of an image of sizes[i] = (width, height)): the annotation index keeps the masks the zero-area
    check made. The polygons of all the annotations of one image size are rasterised in one pycocotools call."""
    checked = [_before_rasterising(ann, width, height, category_ids) for ann, (width, height) in zip(anns, sizes)]
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, (_, usable, _) in enumerate(checked):
        if usable is not None:
            by_size.setdefault(sizes[index], []).append(index)
    rles: dict[int, dict[str, Any]] = {}
    for (width, height), indexes in by_size.items():
        polygons = [poly for index in indexes for poly in checked[index][1]]
        made = iter(mask_utils.frPyObjects(polygons, height, width))
        for index in indexes:
            parts = [next(made) for _ in checked[index][1]]
            rles[index] = parts[0] if len(parts) == 1 else mask_utils.merge(parts)  # a merge of one changes nothing
    results = []
    for index, (problems, _, box_pending) in enumerate(checked):
        rle = rles.get(index)
        if rle is not None and is_empty_rle(rle):
            problems.append(("zero_area_mask", "polygon covers no pixel"))
        results.append((problems + box_problems(anns[index].get("bbox"), problems) if box_pending else problems, rle))
    return results


def is_empty_rle(rle: dict[str, Any]) -> bool:
    """Whether a pycocotools-made RLE covers no pixel: pycocotools writes no empty run but the first, so an empty
    mask is one run, one value in the counts string (each value ends on a character below 'P')."""
    counts = rle["counts"]
    return sum(character < 80 for character in (counts.encode() if isinstance(counts, str) else counts)) <= 1


def _before_rasterising(
    ann: dict[str, Any], width: int, height: int, category_ids: set[Any]
) -> tuple[list[tuple[str, str]], list[list[float]] | None, bool]:
    """(problems found without rasterising, the polygons to rasterise for the zero-area check (None: no check),
    whether the bbox is still to be checked after it)."""
    if "instseg_problem" in ann:
        return [("bad_label_line", ann["instseg_problem"])], None, False
    problems: list[tuple[str, str]] = []
    category = ann.get("category_id")
    if not is_integer(category) or category not in category_ids:
        problems.append(("unknown_category", f"category_id {json.dumps(category)[:40]} is not in categories"))
    area = ann.get("area")
    if not is_number(area) or not math.isfinite(area):
        problems.append(("bad_area", f"area {json.dumps(area)[:40]} is not a finite number"))
    seg = ann.get("segmentation")
    if isinstance(seg, dict):  # RLE
        problems += rle_problems(seg, width, height)
        return problems + box_problems(ann.get("bbox"), problems), None, False
    if not seg:
        return problems + [("empty_segmentation", "segmentation is missing or empty")], None, False
    if not isinstance(seg, list) or not all(isinstance(poly, list) for poly in seg):
        shape = "a flat list of numbers" if isinstance(seg, list) and _numbers_ok(seg) else json.dumps(seg)[:40]
        message = f"segmentation must be polygons [[x1, y1, x2, y2, ...], ...] or an RLE object, not {shape}"
        return problems + [("bad_segmentation", message)], None, False
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
        if not _all_finite(poly):
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
    rasterise = usable if usable and len(usable) == len(seg) and width and height else None
    return problems, rasterise, True


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


@dataclass
class AnnotationScan:
    """What validation finds without looking inside annotations (duplicate ids, annotations of no image), and the
    image size each annotation is checked against (-1 where its image is unknown)."""

    head: list[Problem]  # duplicate image and category ids: listed first
    before: dict[int, list[Problem]]  # annotation position -> its duplicate-id / unknown-image problems
    bad: set[int]
    sizes: np.ndarray  # int64 [annotations, 2]: width, height (0 where the JSON has none)
    category_ids: set[Any]


def scan_annotations(coco: dict[str, Any], source: str) -> AnnotationScan:
    images = {}
    head: list[Problem] = []
    for kind, key, items in (
        ("duplicate_image_id", "image", coco["images"]),
        ("duplicate_category_id", "category", coco["categories"]),
    ):
        seen: set[Any] = set()
        for item in items:
            if item.get("id") in seen:
                head.append(Problem(kind, source, f"{key} id {item.get('id')} appears more than once"))
            seen.add(item.get("id"))
    for image in coco["images"]:
        images.setdefault(image.get("id"), (int(image.get("width") or 0), int(image.get("height") or 0)))
    before: dict[int, list[Problem]] = {}
    bad: set[int] = set()
    seen_ann: set[Any] = set()
    sizes = np.full((len(coco["annotations"]), 2), -1, dtype=np.int64)
    for position, ann in enumerate(coco["annotations"]):
        if ann.get("id") in seen_ann:
            message = f"annotation id {ann.get('id')} appears more than once"
            before.setdefault(position, []).append(
                Problem("duplicate_annotation_id", _ann_location(source, ann), message)
            )
            bad.add(position)
        seen_ann.add(ann.get("id"))
        size = images.get(ann.get("image_id"))
        if size is None:
            message = f"image_id {ann.get('image_id')} is not in images"
            before.setdefault(position, []).append(Problem("unknown_image", _ann_location(source, ann), message))
            bad.add(position)
        else:
            sizes[position] = size
    return AnnotationScan(head, before, bad, sizes, {c.get("id") for c in coco["categories"]})


CHUNK = 4096  # annotations a worker process checks at a time
IMAGE_CHUNK = 512  # image files likewise


def annotation_chunks(coco: dict[str, Any], scan: AnnotationScan) -> Iterator[tuple[int, list, np.ndarray, set]]:
    """(first position, annotations, their image sizes, category ids) for each CHUNK of the file's annotations."""
    annotations = coco["annotations"]
    for start in range(0, len(annotations), CHUNK):
        yield start, annotations[start : start + CHUNK], scan.sizes[start : start + CHUNK], scan.category_ids


def _chunk_problems(start: int, anns: list, sizes: np.ndarray, category_ids: set) -> dict[int, list[tuple[str, str]]]:
    pairs = sizes.tolist()
    known = [offset for offset, (width, _) in enumerate(pairs) if width >= 0]  # annotations of an image in the file
    checked = checked_annotations([anns[i] for i in known], [tuple(pairs[i]) for i in known], category_ids)
    return {start + offset: problems for offset, (problems, _) in zip(known, checked) if problems}


def merge_problems(
    coco: dict[str, Any], source: str, scan: AnnotationScan, found: dict[int, list[tuple[str, str]]]
) -> tuple[list[Problem], set[int]]:
    """Every problem in the order one pass over the file meets them, and the positions of the bad annotations."""
    problems = list(scan.head)
    bad = scan.bad | set(found)
    annotations = coco["annotations"]
    for position in sorted(set(scan.before) | set(found)):
        problems.extend(scan.before.get(position, []))
        location = _ann_location(source, annotations[position])
        problems.extend(Problem(kind, location, message) for kind, message in found.get(position, []))
    return problems, bad


def validate_annotations(coco: dict[str, Any], source: str, workers: int = 1) -> tuple[list[Problem], set[int]]:
    """Problems of the annotations of one COCO dict (no image is opened) and the positions of the bad
    annotations in coco["annotations"]; `workers` processes share the per-annotation checks."""
    scan = scan_annotations(coco, source)
    found: dict[int, list[tuple[str, str]]] = {}
    for part in map_chunks(_chunk_problems, annotation_chunks(coco, scan), workers):
        found.update(part)
    return merge_problems(coco, source, scan, found)


# what a complete file of these formats ends with: a file cut short lacks it (JPEG's EOI marker, PNG's IEND chunk)
END_MARKERS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",)}


def _ends_whole(path: Path, image: Image.Image) -> bool:
    markers = END_MARKERS.get(image.format or "")
    if not markers:
        return False
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - 16))
        tail = file.read().rstrip(b"\x00")  # some writers pad after the end marker
    return tail.endswith(markers)


def image_problems(path: Path, width: int, height: int, location: str, decode: bool = False) -> list[Problem]:
    """Missing, unreadable or truncated files, and a size that differs from the JSON's. A JPEG or PNG whose
    header opens and whose file ends with its format's end marker counts as whole without decoding it (a
    tenth of the time at COCO size); any other file, and all of them with `decode`, is decoded fully."""
    if not path.is_file():
        return [Problem("image_missing", location, f"{path} does not exist")]
    try:
        with Image.open(path) as image:
            size = image.size
            if decode or not _ends_whole(path, image):
                image.load()  # decodes fully: a truncated file raises here
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return [Problem("image_unreadable", location, f"{path}: {str(exc).splitlines()[0]}")]
    if width and height and size != (width, height):
        return [
            Problem("image_size_mismatch", location, f"{path} is {size[0]}x{size[1]}, the JSON says {width}x{height}")
        ]
    return []


def _chunk_image_problems(checks: list[tuple[Path, int, int, str]], decode: bool) -> list[list[Problem]]:
    return [image_problems(*check, decode=decode) for check in checks]


def check_split(data: SplitData, source: str, workers: int = 1, decode: bool = False) -> list[Problem]:
    """Every problem of one split: annotations, images and (YOLO) label/image pairing, in the order a single
    pass finds them; `workers` processes share the work, `decode` decodes every image (image_problems)."""
    problems, _ = validate_annotations(data.coco, source, workers)
    checks: list[tuple[Path, int, int, str] | Problem] = []
    for image in data.coco["images"]:
        path = data.image_files.get(image.get("id"))
        location = f"{source}: image id {image.get('id')} ({image.get('file_name')})"
        if image.get("id") in data.outside:
            why = "file_name must be a relative path inside the image folder (it is absolute, leaves it, or is no path)"
            checks.append(Problem("image_outside_dataset", location, why))
        elif path is None:
            checks.append(Problem("image_missing", location, "no file_name"))
        else:
            checks.append((path, int(image.get("width") or 0), int(image.get("height") or 0), location))
    files = [check for check in checks if not isinstance(check, Problem)]
    chunks = [(files[i : i + IMAGE_CHUNK], decode) for i in range(0, len(files), IMAGE_CHUNK)]
    found = iter([problems for part in map_chunks(_chunk_image_problems, chunks, workers) for problems in part])
    for check in checks:
        problems.extend([check] if isinstance(check, Problem) else next(found))
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
