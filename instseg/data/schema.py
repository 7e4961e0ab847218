"""The shape of a COCO instances file, checked before anything indexes it: a file that is not even a COCO
dict (a list, `images: [1, 2]`, an image without an integer id, `width: "wide"`) stops with one line
naming the file and the item. What is wrong inside one annotation (its segmentation, its box) is a
`Problem` instead (instseg.data.validation), so that `data check` lists them all and
`data.on_invalid=skip` can drop them.
"""

from __future__ import annotations

import gc
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson

from instseg.data.parallel import available_cores, map_chunks
from instseg.data.rle import covered_pixels
from instseg.errors import DataError


def is_integer(value: Any) -> bool:
    """An int that is not a bool (JSON `true` is not an id or a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a block that makes or walks millions of objects without a cycle (a
    COCO file's dicts and lists): its passes over them cost more than the work (orjson parses a COCO-sized file
    in 6.5 s with it off, 13.7 s with it on). Reference counting still frees everything; it is back on after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_json(raw: bytes) -> tuple[Any, bool]:
    """(the parsed value, plain): orjson reads a COCO-sized file 2-3x faster than json; what it refuses (NaN,
    Infinity, integers beyond 64 bits) json reads as before, and `plain` is False: then only json writes the
    value back unchanged (orjson would write NaN as null)."""
    with paused_gc():
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            return json.loads(raw.decode("utf-8")), False


def read_json_file(path: Path, what: str = "JSON") -> Any:
    """The parsed file, or DataError naming it (missing, unreadable, not JSON)."""
    return read_json_bytes(path, read_file_bytes(path), what)[0]


def read_file_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None


def read_json_bytes(path: Path, raw: bytes, what: str = "JSON") -> tuple[Any, bool]:
    """parse_json of `path`'s bytes, or DataError naming the file."""
    try:
        return parse_json(raw)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not {what} ({exc})") from None


def check_coco_structure(data: Any, source: str | Path) -> dict[str, Any]:
    """`data` if it has the shape of a COCO instances dict; else DataError naming `source` and the item."""
    if not isinstance(data, dict):
        raise DataError(
            f"{source}: a COCO file is a JSON object with 'images', 'annotations' and 'categories', "
            f"not a {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(
                f"{source}: a COCO file needs 'images', 'annotations' and 'categories' ('{key}' is missing)"
            )
        if not isinstance(data[key], list):
            raise DataError(f"{source}: '{key}' must be a list, not a {type(data[key]).__name__}")
    for key, required in (("images", ("id",)), ("annotations", ("id", "image_id")), ("categories", ("id",))):
        for index, item in enumerate(data[key]):
            if not isinstance(item, dict):
                raise DataError(f"{source}: {key}[{index}] must be an object, not {json.dumps(item)[:40]}")
            for field in required:
                if not is_integer(item.get(field)):
                    raise DataError(
                        f"{source}: {key}[{index}] needs an integer '{field}' (got {json.dumps(item.get(field))[:40]})"
                    )
    for index, image in enumerate(data["images"]):
        for field in ("width", "height"):
            if field in image and not (is_integer(image[field]) and image[field] >= 0):
                raise DataError(
                    f"{source}: image id {image['id']} (images[{index}]): '{field}' must be a whole number of pixels "
                    f"(got {json.dumps(image[field])[:40]})"
                )
    for index, category in enumerate(data["categories"]):
        if not isinstance(category.get("name", ""), str):
            raise DataError(f"{source}: category id {category['id']} (categories[{index}]): 'name' must be a string")
    return data


def read_coco_file(path: Path) -> dict[str, Any]:
    """A COCO instances file, read and shape-checked."""
    return read_coco_bytes(path, read_file_bytes(path))[0]


def read_coco_bytes(path: Path, raw: bytes) -> tuple[dict[str, Any], bool]:
    """(the shape-checked COCO dict parsed from `raw`, `path`'s bytes; plain as in parse_json)."""
    data, plain = read_json_bytes(path, raw, "readable JSON")
    return check_coco_structure(data, path), plain


def decode_rle_string(text: str) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string (6-bit groups from '0', a sign bit, deltas against
    the run two back); None where the text is not such a string."""
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                return None
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def is_rle_size(size: Any) -> bool:
    """[height, width]: two whole numbers of pixels."""
    return isinstance(size, list) and len(size) == 2 and all(is_integer(v) and v >= 0 for v in size)


def rle_runs(counts: Any) -> list[int] | None:
    """The run lengths of an RLE's 'counts' (a compressed string or a list); None where they are not
    non-negative whole numbers."""
    runs = decode_rle_string(counts) if isinstance(counts, str) else counts
    if not isinstance(runs, list) or not all(is_integer(v) and v >= 0 for v in runs):
        return None
    return runs


def rle_covers(rle: dict[str, Any]) -> bool:
    """An RLE whose 'size' is [height, width] and whose run lengths add up to exactly that many pixels."""
    size, runs = rle.get("size"), rle_runs(rle.get("counts"))
    return is_rle_size(size) and runs is not None and sum(runs) == size[0] * size[1]


PARALLEL_RLE_STRINGS = 20_000  # fewer are decoded in this process: starting workers would cost more


def _sound_rle_strings(results: list[Any]) -> dict[int, bool]:
    """Detection index -> True for each compressed-RLE segmentation that is sound (rle_covers), decoded for all
    detections at once (instseg.data.rle); one a string cannot settle there is left to rle_covers."""
    at, strings, pixels = [], [], []
    for index, result in enumerate(results):
        value = result.get("segmentation") if isinstance(result, dict) else None
        if isinstance(value, dict) and isinstance(value.get("counts"), str) and is_rle_size(value.get("size")):
            at.append(index)
            strings.append(value["counts"])
            pixels.append(value["size"][0] * value["size"][1])
    if not at:
        return {}
    # a few large chunks over the cores: pickling the strings to a worker costs far less than decoding them
    workers = available_cores() if len(strings) >= PARALLEL_RLE_STRINGS else 1
    step = -(-len(strings) // workers)
    parts = map_chunks(covered_pixels, [(strings[i : i + step],) for i in range(0, len(strings), step)], workers)
    totals = np.concatenate([part[0] for part in parts])
    well_formed = np.concatenate([part[1] for part in parts])
    sound = well_formed & (totals == np.asarray(pixels, dtype=np.int64))
    return {index: True for index, good in zip(at, sound.tolist()) if good}


def check_results(
    results: Any, source: str | Path, images: dict[int, dict[str, Any]], category_ids: set[int], iou_type: str
) -> list[dict[str, Any]]:
    """`results` if it is a COCO results list that fits the ground truth (its images and categories) and
    carries what `iou_type` evaluates; else DataError naming `source` and the first bad detection."""
    if not isinstance(results, list):
        raise DataError(f"{source}: a COCO results file is a JSON list of detections, not a {type(results).__name__}")
    needed = "segmentation" if iou_type == "segm" else "bbox"
    sound = _sound_rle_strings(results) if needed == "segmentation" else {}
    for index, result in enumerate(results):
        where = f"{source}: detection {index}"
        if not isinstance(result, dict):
            raise DataError(f"{where} must be an object, not {json.dumps(result)[:40]}")
        image_id, category_id, score = result.get("image_id"), result.get("category_id"), result.get("score")
        if not is_integer(image_id) or image_id not in images:
            raise DataError(f"{where}: image_id {json.dumps(image_id)[:40]} is not an image of the ground truth")
        if not is_integer(category_id) or category_id not in category_ids:
            raise DataError(
                f"{where}: category_id {json.dumps(category_id)[:40]} is not a category of the ground truth"
            )
        if not is_number(score) or not math.isfinite(score):
            raise DataError(f"{where}: 'score' must be a number (got {json.dumps(score)[:40]})")
        value = result.get(needed)
        if needed == "bbox" and not (isinstance(value, list) and len(value) == 4 and all(is_number(v) for v in value)):
            raise DataError(f"{where}: --iou-type bbox needs 'bbox': [x, y, w, h] (got {json.dumps(value)[:40]})")
        if needed == "segmentation" and not (
            isinstance(value, dict) and (sound.get(index, False) or rle_covers(value))
        ):
            raise DataError(
                f"{where}: --iou-type segm needs 'segmentation' as an RLE object {{size, counts}} "
                f"(got {json.dumps(value)[:40]})"
            )
        image = images[image_id]
        if needed == "segmentation" and value["size"] != [image.get("height"), image.get("width")]:
            raise DataError(
                f"{where}: RLE size {value['size']} is not image {image_id}'s "
                f"[{image.get('height')}, {image.get('width')}]"
            )
    return results
