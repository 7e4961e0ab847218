"""COCO-json instance segmentation dataset and the label mapping that travels with every model.

Layout: ROOT/annotations/instances_{split}.json, images under ROOT/images/{split}/ (each
image's `file_name` is relative to that folder).

Target schema (torchvision detection models), one dict per image:
    boxes     float32 [N, 4]  x1, y1, x2, y2 in pixels of the image as returned
    labels    int64   [N]     contiguous labels 1..K (0 is background), see LabelMap
    masks     uint8   [N, H, W] binary instance masks at image resolution
    image_id  int             the COCO image id (links predictions back to the json)
    area      float32 [N]     COCO annotation area (used by COCO eval size ranges)
    iscrowd   int64   [N]     always 0: crowd regions are excluded from training targets
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import ImageReadMode, decode_image, read_file

from instseg.data.formats import annotation_path, available_splits
from instseg.data.ground_truth import LabelMap, coco_from_dict
from instseg.data.index import IMAGE_OK, AnnotationIndex, ensure_index, fingerprints
from instseg.data.index import META as INDEX_META
from instseg.data.schema import read_coco_file
from instseg.data.validation import Problem
from instseg.errors import DataError

Target = dict[str, Any]


def check_dataset_root(root: str | Path, splits: tuple[str, ...]) -> None:
    """Raise DataError naming the missing path and how to create the data."""
    for split in splits:
        path = annotation_path(root, split)
        if path.is_file():
            continue
        present = available_splits(root)
        if present:
            raise DataError(
                f"split '{split}' not found: {path} is missing ({root} has {', '.join(present)}). Make a "
                f"train/val split with `instseg data split {root} --val 0.2`, or set data.train_split / data.val_split"
            )
        raise DataError(
            f"dataset not found: {path} is missing. Create the synthetic dataset with "
            f"`instseg data synth {root}` or point data.root at a COCO-format dataset "
            f"(annotations/instances_{{split}}.json + images/{{split}}/)"
        )


class CocoInstanceDataset(torch.utils.data.Dataset):
    """(image uint8 [3, H, W], target) pairs; see the module docstring for the target.

    Samples come from the split's annotation index (instseg.data.index: flat, memory-mapped arrays, built once
    per version of the split and shared by every process), so opening the dataset reads no JSON and a forked
    loader worker copies nothing. `index` names the index folder when the caller found it already (the driver
    hands it to its workers); otherwise it is found, or built, in `index_cache`. pycocotools' COCO of the split
    (`coco`) is read only when something asks for it: COCO evaluation of a validation split.

    Images stay uint8 (a quarter of float32's bytes) until the loop moves them to the device, where
    engine.loops scales them to [0, 1]."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        label_map: LabelMap | None = None,
        hflip_prob: float = 0.0,
        on_invalid: str = "error",
        index: str | Path | None = None,
        index_cache: str | Path | None = None,
    ) -> None:
        check_dataset_root(root, (split,))
        self.root = Path(root)
        self.split = split
        self.annotation_file = annotation_path(root, split)
        if index is None or not (Path(index) / INDEX_META).is_file():
            index = ensure_index(root, split, index_cache).folder  # a node that cannot see the driver's builds its own
        self.index = AnnotationIndex(index)
        self.label_map = label_map or LabelMap.from_categories(_categories_as_indexed(self.index.categories))
        self.hflip_prob = hflip_prob
        self.on_invalid = on_invalid
        self.skipped = self._apply_policy(on_invalid)
        self.image_ids = self.index.image_id[self._rows].tolist()
        self._coco: COCO | None = None

    def _apply_policy(self, on_invalid: str) -> Counter:
        """The index's validation problems, annotations of categories the label map lacks and images without a
        file; `error` raises with the problems, `skip` drops the bad annotations and the images without a file,
        and returns the count per reason. Sets the rows of the images read (_rows), each index annotation's
        model label (_labels) and whether it is kept (_kept)."""
        index = self.index
        source = str(self.annotation_file)
        problems = index.problems(self.root)
        self._labels = model_labels(self.label_map, index.category_id)
        self._kept = self._labels > 0
        unknown = np.flatnonzero(~self._kept)
        for at in unknown[np.argsort(index.position[unknown], kind="stable")].tolist():
            problems.append(
                Problem(
                    "unknown_category",
                    source,
                    f"annotation id {int(index.ann_id[at])}: category_id {int(index.category_id[at])} "
                    "is not among the model's classes",
                )
            )
        problems.extend(problem for problem, _ in index.image_problems(self.root))
        self._rows = np.flatnonzero(index.status == IMAGE_OK)
        if not problems:
            return Counter()
        if on_invalid != "skip":
            listed = "; ".join(str(p).strip() for p in problems[:3])
            raise DataError(
                f"{len(problems)} problem(s) in {source} (first: {listed}). "
                f"Run `instseg data check {self.root}` for all of "
                "them, or set data.on_invalid=skip to drop them"
            )
        return Counter(problem.kind for problem in problems)

    @property
    def coco(self) -> COCO:
        """pycocotools' COCO of what this dataset reads (with data.on_invalid=skip, without what it drops), read
        from the annotation file the first time it is asked for."""
        if self._coco is None:
            dataset = read_coco_file(self.annotation_file)
            if self.skipped:
                kept_ids = set(self.image_ids)
                rows_kept = np.zeros(len(self.index), dtype=bool)
                rows_kept[self._rows] = True
                image_of = np.repeat(np.arange(len(self.index)), np.diff(self.index.ann_start))
                positions = set(self.index.position[self._kept & rows_kept[image_of]].tolist())
                dataset = dict(dataset)
                dataset["images"] = [img for img in dataset["images"] if img["id"] in kept_ids]
                dataset["annotations"] = [ann for at, ann in enumerate(dataset["annotations"]) if at in positions]
            self._coco = coco_from_dict(dataset)
        return self._coco

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def image_dir(self) -> Path:
        return self.root / "images" / self.split

    def image_path(self, image_id: int) -> Path:
        """Only images that passed _apply_policy are read, so the name is known to stay inside image_dir."""
        return self.image_dir / self.index.file_name(self.index.row_of(image_id))

    def image_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(widths, heights) of the dataset's images, in dataset order, as the annotation file gives them."""
        return self.index.width[self._rows], self.index.height[self._rows]

    def instance_counts(self) -> np.ndarray:
        """Annotations of each image, crowd regions included, in dataset order (what pycocotools' imgToAnns has)."""
        starts, ends = self.index.ann_start[self._rows], self.index.ann_start[self._rows + 1]
        kept = np.concatenate(([0], np.cumsum(self._kept)))
        return kept[ends] - kept[starts]

    @property
    def num_instances(self) -> int:
        return int(self.instance_counts().sum())

    def _instances(self, row: int) -> np.ndarray:
        """Index annotations of image row `row` that are training targets: kept, and not crowd regions (COCO
        eval ignores matches to those; they are not instances to learn)."""
        start, end = int(self.index.ann_start[row]), int(self.index.ann_start[row + 1])
        return start + np.flatnonzero(self._kept[start:end] & ~self.index.iscrowd[start:end])

    def _masks(self, chosen: np.ndarray, height: int, width: int, flip: bool = False) -> torch.Tensor:
        """uint8 [N, H, W]: each instance's cropped RLE decoded and pasted into zeroed masks (mirrored when
        flipped: the crop is never copied twice)."""
        masks = torch.zeros((len(chosen), height, width), dtype=torch.uint8)
        for index, at in enumerate(chosen.tolist()):
            rle, x0, y0 = self.index.crop_rle(at)
            h, w = rle["size"]
            pixels = torch.from_numpy(mask_utils.decode(rle))
            if flip:
                x0, pixels = width - x0 - w, pixels.flip(-1)
            masks[index, y0 : y0 + h, x0 : x0 + w] = pixels
        return masks

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        row = int(self._rows[index])
        image_id = int(self.index.image_id[row])
        path = self.image_dir / self.index.file_name(row)
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{self.annotation_file}: image id {image_id}: cannot read {path} ({exc})") from None
        height, width = image.shape[-2:]
        expected = tuple(int(v) if v >= 0 else None for v in (self.index.width[row], self.index.height[row]))
        if expected != (width, height):
            raise DataError(
                f"{self.annotation_file}: image id {image_id}: {path} is {width}x{height} but the JSON says "
                f"{expected[0]}x{expected[1]} (run `instseg data check {self.root}`)"
            )
        chosen = self._instances(row)
        # horizontal flip: image, boxes and masks together (masks are pasted mirrored, never copied twice)
        flip = self.hflip_prob > 0 and torch.rand(1).item() < self.hflip_prob
        boxes = torch.from_numpy(self.index.bbox[chosen])
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        if flip:
            image = image.flip(-1)
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        target: Target = {
            "boxes": boxes,
            "labels": torch.from_numpy(self._labels[chosen]),
            "masks": self._masks(chosen, height, width, flip),
            "image_id": image_id,
            "area": torch.from_numpy(self.index.area[chosen]),
            "iscrowd": torch.zeros(len(chosen), dtype=torch.int64),
        }
        return image, target


def model_labels(label_map: LabelMap, category_ids: np.ndarray) -> np.ndarray:
    """int64 model label (1..K) of each COCO category id, 0 for an id the label map lacks."""
    ids = np.asarray(label_map.category_ids, dtype=np.int64)
    if not len(ids):
        return np.zeros(len(category_ids), dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    found = np.minimum(np.searchsorted(ids[order], category_ids), len(ids) - 1)
    return np.where(ids[order][found] == category_ids, order[found] + 1, 0).astype(np.int64)


def _categories_as_indexed(categories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The categories as pycocotools' loadCats(getCatIds()) lists them: one entry per entry of the file, each
    showing the last entry of its id."""
    last = {category["id"]: category for category in categories}
    return [last[category["id"]] for category in categories]


def dataset_fingerprint(root: str | Path, splits: tuple[str, ...]) -> str:
    """sha256 of the splits' annotation files plus each image's name and size: tags runs with their
    data in seconds even for COCO-sized folders (image bytes are not read; see index.fingerprints)."""
    return fingerprints(root, splits)[0]
