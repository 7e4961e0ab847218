"""`instseg data split ROOT --val 0.2 --seed 0`: a train/val split for data that comes as one split.

COCO128-seg, say, converts to a single `train2017` split, and training needs a validation split. The split
is class-stratified (iterative stratification, rarest class first), so each class keeps about `val` of its
images in val and at least one in train when it is on two or more. `--group-by-folder` keeps images of the
same source folder (the folder part of `file_name`) on one side, e.g. frames of one video. The same
(data, val, seed) gives the same split. Images are hard-linked (copied across file systems) into
ROOT/images/{train,val}/; nothing of the source split is changed, and existing target splits are
replaced only with `--overwrite`.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from instseg.data.files import atomic_path, json_bytes, link_or_copy, staged_folder
from instseg.data.formats import annotation_path, available_splits
from instseg.data.schema import parse_json, paused_gc
from instseg.errors import DataError


def stratified_val_ids(coco: dict[str, Any], val_fraction: float, seed: int, group_by_folder: bool = False) -> set[int]:
    """Image ids for val: about `val_fraction` of the images (or folders) and of the images of each class.

    Iterative stratification (Sechidis et al. 2011): the class with the fewest unassigned images goes first;
    each of its images goes to the side that still wants most of that class (ties: the side that wants more
    images, then a seeded coin). A class on 2 images keeps one in train."""
    groups: dict[str, list[int]] = defaultdict(list)
    for image in sorted(coco["images"], key=lambda i: i["id"]):
        key = str(Path(image["file_name"]).parent) if group_by_folder else str(image["id"])
        groups[key].append(image["id"])
    if len(groups) < 2:
        raise DataError(
            "--group-by-folder: every image is in one folder, so there is nothing to split"
            if group_by_folder
            else "a split needs at least 2 images"
        )
    classes_of_image: dict[int, set[int]] = defaultdict(set)
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            classes_of_image[ann["image_id"]].add(ann["category_id"])
    classes = {key: set().union(*(classes_of_image[i] for i in ids)) for key, ids in groups.items()}
    rng = random.Random(seed)
    order = list(groups)
    rng.shuffle(order)
    shares = {"val": val_fraction, "train": 1 - val_fraction}
    per_class = Counter(c for key in order for c in classes[key])
    wanted = {side: {c: share * n for c, n in per_class.items()} for side, share in shares.items()}
    wanted_images = {side: share * len(coco["images"]) for side, share in shares.items()}
    side_of: dict[str, str] = {}

    def assign(key: str, side: str) -> None:
        side_of[key] = side
        wanted_images[side] -= len(groups[key])
        for c in classes[key]:
            wanted[side][c] -= 1

    # each round: the class with the fewest unassigned images (counted as keys go, not recounted every round)
    # and its unassigned keys in shuffled order
    remaining = Counter(c for key in order for c in classes[key])
    keys_of: dict[int, list[str]] = defaultdict(list)
    for key in order:
        for c in classes[key]:
            keys_of[c].append(key)
    while remaining:
        rarest = min(remaining, key=lambda c: (remaining[c], c))
        for key in [key for key in keys_of.pop(rarest) if key not in side_of]:
            assign(key, max(shares, key=lambda side: (wanted[side][rarest], wanted_images[side], rng.random())))
            for c in classes[key]:
                remaining[c] -= 1
                if not remaining[c]:
                    del remaining[c]
    for key in order:  # images without instances: wherever images are still wanted
        if key not in side_of:
            assign(key, max(shares, key=lambda side: (wanted_images[side], rng.random())))
    return {image_id for key, side in side_of.items() if side == "val" for image_id in groups[key]}


@paused_gc()
def split_dataset(
    root: Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    source: str | None = None,
    group_by_folder: bool = False,
    train_split: str = "train",
    val_split: str = "val",
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write ROOT's `source` split as `train_split` + `val_split`; returns image and instance counts per split."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val must be between 0 and 1 (got {val_fraction})")
    splits = available_splits(root)
    if not splits:
        raise DataError(
            f"{root}: no annotations/instances_*.json (convert the data first: `instseg data convert SRC {root}`)"
        )
    if source is None:
        if len(splits) > 1:
            raise DataError(f"{root} has several splits ({', '.join(splits)}): name the one to split with --source")
        source = splits[0]
    if source not in splits:
        raise DataError(f"{root}: no split '{source}' (it has: {', '.join(splits)})")
    if source in (train_split, val_split) or train_split == val_split:
        raise DataError(
            f"the source split '{source}' and the new splits '{train_split}' / '{val_split}' must be three names "
            "(set --train-split / --val-split, then data.train_split / data.val_split)"
        )
    existing = [s for s in (train_split, val_split) if s in splits or (root / "images" / s).exists()]
    if existing and not overwrite:
        raise DataError(f"{root} already has split(s) {', '.join(existing)}: pass --overwrite to replace them")
    try:
        coco, plain = parse_json(annotation_path(root, source).read_bytes())
    except (OSError, ValueError) as exc:
        raise DataError(f"{annotation_path(root, source)}: not readable as JSON ({exc})") from None
    if (
        not isinstance(coco, dict)
        or not isinstance(coco.get("images"), list)
        or not isinstance(coco.get("annotations"), list)
    ):
        raise DataError(
            f"{annotation_path(root, source)}: not a COCO instances file (needs 'images' and 'annotations' lists)"
        )
    val_ids = stratified_val_ids(coco, val_fraction, seed, group_by_folder)
    parts = {
        train_split: [i for i in coco["images"] if i["id"] not in val_ids],
        val_split: [i for i in coco["images"] if i["id"] in val_ids],
    }
    counts = {}
    for split, images in parts.items():
        ids = {image["id"] for image in images}
        annotations = [ann for ann in coco["annotations"] if ann["image_id"] in ids]
        _write_split(root, source, split, {**coco, "images": images, "annotations": annotations}, plain)
        counts[split] = {"images": len(images), "instances": len(annotations)}
    return counts


def _write_split(root: Path, source: str, split: str, coco: dict[str, Any], plain: bool) -> None:
    """Images into a temp folder, then the folder and the annotation file renamed into place. The JSON is
    encoded while the images are linked (a thread: linking waits on the file system, not on the interpreter)."""
    with staged_folder(root / "images" / split) as staging, ThreadPoolExecutor(1) as encoder:
        encoded = encoder.submit(json_bytes, coco, plain)
        origin_dir, made = root / "images" / source, set()
        for image in coco["images"]:
            origin = os.path.join(origin_dir, image["file_name"])
            target = os.path.join(staging, image["file_name"])
            parent = os.path.dirname(target)
            if parent not in made:  # one mkdir per folder, not per image
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            try:
                link_or_copy(origin, target)
            except OSError:
                if os.path.isfile(origin):
                    raise
                raise DataError(
                    f"{annotation_path(root, source)}: image id {image['id']}: {origin} does not exist"
                ) from None
        data = encoded.result()
    with atomic_path(annotation_path(root, split)) as tmp:
        tmp.write_bytes(data)
