"""Today's dataset before the annotation index (instseg.data.coco at 543329d, pycocotools' COCO per process): the
reference the index-backed CocoInstanceDataset must match target for target (tests/unit/test_index.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.io import ImageReadMode, decode_image, read_file

from instseg.data.coco import check_dataset_root
from instseg.data.formats import annotation_path, image_file
from instseg.data.ground_truth import LabelMap, coco_from_dict
from instseg.data.rle import to_rle
from instseg.data.schema import read_coco_file
from instseg.data.validation import Problem, validate_annotations
from instseg.errors import DataError

Target = dict[str, Any]


def cropped_rle(segmentation: Any, height: int, width: int) -> tuple[dict[str, Any], int, int]:
    """(RLE of the instance mask cropped to its pixel box, x0, y0): a few hundred bytes that decode in a
    fraction of the full-image time. Made from a full-image rasterisation, so the pixels are exactly
    pycocotools' (rasterising a shifted polygon in the crop alone moves some boundary pixels)."""
    rle = to_rle(segmentation, height, width)
    x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(rle))
    crop = np.asfortranarray(mask_utils.decode(rle)[y : y + max(h, 1), x : x + max(w, 1)])
    return mask_utils.encode(crop), x, y


class LegacyCocoDataset(torch.utils.data.Dataset):
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
