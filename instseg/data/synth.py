"""Deterministic synthetic COCO instance-segmentation data: the embedded default dataset.

Convex shapes (circle, rectangle, triangle) of varied size are painted in order on a noisy
background; later shapes occlude earlier ones, so an instance's visible region is its polygon
minus every polygon painted over it. That difference is written as a multi-polygon `segmentation`
(COCO allows a list of polygons), so masks differ from boxes and from the full shapes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from instseg.data.files import MADE_BY_KEY, SYNTH_DESCRIPTION, atomic_write_json, check_destination, staged_folder
from instseg.errors import DataError

CATEGORIES = ("circle", "rectangle", "triangle")
IMAGE_SIZE = (160, 128)  # width, height
MIN_PIECE_AREA = 4.0  # px^2: slivers left by occlusion smaller than this are dropped
MIN_VISIBLE_FRACTION = 0.25  # an instance hidden more than this is not annotated
# a base colour per class, jittered per instance: learnable in a few tiny-model epochs
BASE_COLOURS = ((220, 60, 50), (50, 170, 70), (60, 90, 220))

SYNTH_KEY = "instseg_synth"  # in each split's "info": the (images, seed) it was made with

Polygon = list[tuple[float, float]]


def _shape_polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> Polygon:
    if kind == "circle":
        n = 24
        return [
            (cx + size * math.cos(2 * math.pi * i / n), cy + size * math.sin(2 * math.pi * i / n)) for i in range(n)
        ]
    if kind == "rectangle":
        half_w, half_h = size, size * 0.6
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    else:
        corners = [(size * math.cos(a), size * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [(cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a) for x, y in corners]


def _signed_area(poly: Polygon) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]))


def _clip_half_plane(poly: Polygon, a: tuple[float, float], b: tuple[float, float], keep_left: bool) -> Polygon:
    """Sutherland-Hodgman: keep the part of `poly` left (or right) of the directed line a->b."""

    def side(p: tuple[float, float]) -> float:
        value = (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])
        return value if keep_left else -value

    out: Polygon = []
    for i, cur in enumerate(poly):
        prev = poly[i - 1]
        s_cur, s_prev = side(cur), side(prev)
        if s_cur >= 0:
            if s_prev < 0:
                t = s_prev / (s_prev - s_cur)
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            out.append(cur)
        elif s_prev >= 0:
            t = s_prev / (s_prev - s_cur)
            out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
    return out


def _subtract_convex(piece: Polygon, cutter: Polygon) -> list[Polygon]:
    """Convex `piece` minus convex `cutter` as disjoint convex pieces (one per cutter edge)."""
    ccw = _signed_area(cutter) > 0  # positive signed area: the inside is left of every edge
    pieces: list[Polygon] = []
    remainder = piece
    for i, a in enumerate(cutter):
        b = cutter[(i + 1) % len(cutter)]
        outside = _clip_half_plane(remainder, a, b, keep_left=not ccw)
        if len(outside) >= 3 and abs(_signed_area(outside)) >= MIN_PIECE_AREA:
            pieces.append(outside)
        remainder = _clip_half_plane(remainder, a, b, keep_left=ccw)
        if len(remainder) < 3:
            break
    return pieces


def _clip_to_image(poly: Polygon, width: int, height: int) -> Polygon:
    frame = [(0.0, 0.0), (float(width), 0.0), (float(width), float(height)), (0.0, float(height))]
    for i, a in enumerate(frame):
        poly = _clip_half_plane(poly, a, frame[(i + 1) % 4], keep_left=True)
        if len(poly) < 3:
            return []
    return poly


def _bbox(pieces: list[Polygon]) -> list[float]:
    xs = [x for piece in pieces for x, _ in piece]
    ys = [y for piece in pieces for _, y in piece]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _render_image(rng: np.random.Generator, width: int, height: int, shapes: list[tuple[int, Polygon]]) -> Image.Image:
    base = rng.integers(90, 170, size=3)
    noise = rng.normal(0, 18, size=(height, width, 3))
    gradient = np.linspace(-25, 25, width)[None, :, None]
    background = np.clip(base[None, None, :] + noise + gradient, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    for category_index, poly in shapes:
        colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in BASE_COLOURS[category_index])
        draw.polygon(poly, fill=colour)
    return image


def _make_image(rng: np.random.Generator, image_id: int, ann_start: int) -> tuple[Image.Image, list[dict]]:
    width, height = IMAGE_SIZE
    shapes: list[tuple[int, Polygon]] = []
    for _ in range(int(rng.integers(1, 5))):
        category_index = int(rng.integers(len(CATEGORIES)))
        size = float(rng.uniform(8, 36))
        poly = _shape_polygon(
            CATEGORIES[category_index],
            float(rng.uniform(0.1, 0.9) * width),
            float(rng.uniform(0.1, 0.9) * height),
            size,
            float(rng.uniform(0, math.pi)),
        )
        shapes.append((category_index, poly))
    image = _render_image(rng, width, height, shapes)
    annotations = []
    for index, (category_index, poly) in enumerate(shapes):
        full = _clip_to_image(poly, width, height)
        if not full:
            continue
        pieces = [full]
        for _, occluder in shapes[index + 1 :]:
            pieces = [part for piece in pieces for part in _subtract_convex(piece, occluder)]
        area = sum(abs(_signed_area(piece)) for piece in pieces)
        if not pieces or area < MIN_VISIBLE_FRACTION * abs(_signed_area(full)):
            continue
        annotations.append(
            {
                "id": ann_start + len(annotations),
                "image_id": image_id,
                "category_id": category_index + 1,
                "segmentation": [[round(v, 2) for point in piece for v in point] for piece in pieces],
                "area": round(area, 2),
                "bbox": [round(v, 2) for v in _bbox(pieces)],
                "iscrowd": 0,
            }
        )
    return image, annotations


def synthesize(
    out: str | os.PathLike[str], images: int = 48, seed: int = 0, val_fraction: float = 0.25, overwrite: bool = False
) -> dict[str, int]:
    """Write OUT/images/{train,val}/*.jpg and OUT/annotations/instances_{train,val}.json.

    Same (images, seed) -> byte-identical files. Written to a temp folder and renamed into place,
    so an interrupted run never leaves half a dataset. OUT must be new, empty or an earlier output of ours
    (else `overwrite`). Returns image and instance counts per split.
    """
    if images < 2:
        raise DataError("synthesize needs at least 2 images (one train, one val)")
    out = Path(out)
    check_destination(out, overwrite)
    rng = np.random.default_rng(seed)
    n_val = max(1, round(images * val_fraction))
    splits = {"train": images - n_val, "val": n_val}
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    counts: dict[str, int] = {}
    with staged_folder(out) as staging:
        image_id, ann_id = 1, 1
        for split, count in splits.items():
            (staging / "images" / split).mkdir(parents=True)
            info = {
                "description": f"{SYNTH_DESCRIPTION}, seed {seed}",
                SYNTH_KEY: {"images": images, "seed": seed},
                MADE_BY_KEY: "instseg data synth",
            }
            coco: dict = {"info": info, "images": [], "annotations": [], "categories": categories}
            for _ in range(count):
                image, anns = _make_image(rng, image_id, ann_id)
                file_name = f"{image_id:06d}.jpg"
                image.save(staging / "images" / split / file_name, quality=92)
                coco["images"].append(
                    {"id": image_id, "file_name": file_name, "width": image.width, "height": image.height}
                )
                coco["annotations"].extend(anns)
                image_id += 1
                ann_id += len(anns)
            (staging / "annotations").mkdir(exist_ok=True)
            # json, not orjson: the same bytes as synthetic datasets always had (and the same fingerprints)
            atomic_write_json(staging / "annotations" / f"instances_{split}.json", coco, plain=False)
            counts[f"{split}_images"] = count
            counts[f"{split}_instances"] = len(coco["annotations"])
    return counts


def synthesized_with(root: str | os.PathLike[str], split: str = "train") -> dict[str, int] | None:
    """The {"images", "seed"} a synthetic dataset at `root` was made with; None if it is not one of ours."""
    try:
        info = json.loads((Path(root) / "annotations" / f"instances_{split}.json").read_text()).get("info", {})
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(info, dict) or not str(info.get("description", "")).startswith(SYNTH_DESCRIPTION):
        return None
    made = info.get(SYNTH_KEY)
    return made if isinstance(made, dict) else {}  # ours, from before the settings were recorded
