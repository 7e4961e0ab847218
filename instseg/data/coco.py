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

import contextlib
import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import ImageReadMode, decode_image, read_file

from instseg.data.formats import available_splits, image_file
from instseg.data.schema import read_coco_file
from instseg.data.validation import Problem, validate_annotations
from instseg.errors import DataError

Target = dict[str, Any]


@dataclass(frozen=True)
class LabelMap:
    """COCO category ids <-> contiguous model labels 1..K, with class names."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: list[dict[str, Any]]) -> "LabelMap":
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c["name"]) for c in ordered))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelMap":
        return cls(tuple(int(i) for i in data["category_ids"]), tuple(str(n) for n in data["names"]))

    def to_dict(self) -> dict[str, list]:
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @property
    def num_classes(self) -> int:
        """Model classes including background."""
        return len(self.category_ids) + 1

    def label(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        return self.category_ids[label - 1]


def annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def load_coco(path: Path) -> COCO:
    """pycocotools COCO of a shape-checked file (DataError naming the file and item otherwise)."""
    return coco_from_dict(read_coco_file(path))


def coco_from_dict(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


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


def cropped_rle(segmentation: Any, height: int, width: int) -> tuple[dict[str, Any], int, int]:
    """(RLE of the instance mask cropped to its pixel box, x0, y0): a few hundred bytes that decode in a
    fraction of the full-image time. Made from a full-image rasterisation, so the pixels are exactly
    pycocotools' (rasterising a shifted polygon in the crop alone moves some boundary pixels)."""
    rle = to_rle(segmentation, height, width)
    x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(rle))
    crop = np.asfortranarray(mask_utils.decode(rle)[y : y + max(h, 1), x : x + max(w, 1)])
    return mask_utils.encode(crop), x, y


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Polygons, uncompressed or compressed RLE -> one compressed RLE (pycocotools)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation.get("counts"), str):
        return {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
    return segmentation


class CocoInstanceDataset(torch.utils.data.Dataset):
    """(image uint8 [3, H, W], target) pairs; see the module docstring for the target.

    Images stay uint8 (a quarter of float32's bytes) until the loop moves them to the device, where
    engine.loops scales them to [0, 1]."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        label_map: LabelMap | None = None,
        hflip_prob: float = 0.0,
        on_invalid: str = "error",
    ) -> None:
        check_dataset_root(root, (split,))
        self.root = Path(root)
        self.split = split
        self.annotation_file = annotation_path(root, split)
        self.coco = coco_from_dict(read_coco_file(self.annotation_file))
        self.label_map = label_map or LabelMap.from_categories(self.coco.loadCats(self.coco.getCatIds()))
        self.hflip_prob = hflip_prob
        self.skipped = self._apply_policy(on_invalid)
        self.image_ids = sorted(self.coco.getImgIds())
        self._crops: dict[int, tuple[dict[str, Any], int, int]] = {}

    def _apply_policy(self, on_invalid: str) -> Counter:
        """Validate annotations and image files; `error` raises with the problems, `skip` drops the bad
        annotations and the images without a file, and returns the count per reason."""
        source = str(self.annotation_file)
        problems, bad = validate_annotations(self.coco.dataset, source)
        known = set(self.label_map.category_ids)
        for position, ann in enumerate(self.coco.dataset["annotations"]):
            if position not in bad and ann.get("category_id") not in known:
                problems.append(
                    Problem(
                        "unknown_category",
                        source,
                        f"annotation id {ann.get('id')}: category_id {ann.get('category_id')} "
                        "is not among the model's classes",
                    )
                )
                bad.add(position)
        missing = []
        for img in self.coco.dataset["images"]:
            found = image_file(self.image_dir, img.get("file_name"))
            if found is None or not found[0].is_file():
                missing.append(img)
                kind, why = (
                    ("image_missing", f"{found[0]} does not exist")
                    if found
                    else ("image_outside_dataset", "file_name must be a relative path inside the image folder")
                )
                problems.append(Problem(kind, f"{source}: image id {img['id']}", why))
        if not problems:
            return Counter()
        if on_invalid != "skip":
            listed = "; ".join(str(p).strip() for p in problems[:3])
            raise DataError(
                f"{len(problems)} problem(s) in {source} (first: {listed}). "
                f"Run `instseg data check {self.root}` for all of "
                "them, or set data.on_invalid=skip to drop them"
            )
        missing_ids = {img["id"] for img in missing}
        dataset = dict(self.coco.dataset)
        dataset["images"] = [img for img in dataset["images"] if img["id"] not in missing_ids]
        dataset["annotations"] = [
            ann
            for position, ann in enumerate(dataset["annotations"])
            if position not in bad and ann.get("image_id") not in missing_ids
        ]
        self.coco = coco_from_dict(dataset)
        return Counter(problem.kind for problem in problems)

    def _masks(self, anns: list[dict[str, Any]], height: int, width: int, flip: bool = False) -> torch.Tensor:
        """uint8 [N, H, W]: each instance is kept as an RLE of its mask cropped to its box, made the
        first time the annotation is read (polygons are rasterised once, not every epoch); a sample
        decodes only the crops and pastes them into zeroed masks."""
        masks = torch.zeros((len(anns), height, width), dtype=torch.uint8)
        for index, ann in enumerate(anns):
            crop = self._crops.get(ann["id"])
            if crop is None:
                crop = self._crops[ann["id"]] = cropped_rle(ann["segmentation"], height, width)
            rle, x0, y0 = crop
            h, w = rle["size"]
            pixels = torch.from_numpy(mask_utils.decode(rle))
            if flip:
                x0, pixels = width - x0 - w, pixels.flip(-1)
            masks[index, y0 : y0 + h, x0 : x0 + w] = pixels
        return masks

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def image_dir(self) -> Path:
        return self.root / "images" / self.split

    def image_path(self, image_id: int) -> Path:
        """Only images that passed _apply_policy are here, so the name is known to stay inside image_dir."""
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.image_ids[index]
        path = self.image_path(image_id)
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{self.annotation_file}: image id {image_id}: cannot read {path} ({exc})") from None
        height, width = image.shape[-2:]
        # crowd regions are not instances to learn (COCO eval ignores matches to them)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        info = self.coco.imgs[image_id]
        if (info.get("width"), info.get("height")) != (width, height):
            raise DataError(
                f"{self.annotation_file}: image id {image_id}: {path} is {width}x{height} but the JSON says "
                f"{info.get('width')}x{info.get('height')} (run `instseg data check {self.root}`)"
            )
        # horizontal flip: image, boxes and masks together (masks are pasted mirrored, never copied twice)
        flip = self.hflip_prob > 0 and torch.rand(1).item() < self.hflip_prob
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        if flip:
            image = image.flip(-1)
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        target: Target = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_map.label(a["category_id"]) for a in anns], dtype=torch.int64),
            "masks": self._masks(anns, height, width, flip),
            "image_id": image_id,
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        return image, target


def dataset_fingerprint(root: str | Path, splits: tuple[str, ...]) -> str:
    """sha256 of the splits' annotation files plus each image's name and size: tags runs with their
    data in seconds even for COCO-sized folders (image bytes are not read)."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(annotation_path(root, split).read_bytes())
        for image in sorted((Path(root) / "images" / split).glob("*")):
            digest.update(f"{image.name}:{image.stat().st_size};".encode())
    return digest.hexdigest()[:16]
