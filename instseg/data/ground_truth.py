"""What COCO evaluation and every model share about a split's classes, without the dataset (torch-free: `instseg
metrics` scores a results file without importing torch): the label map (COCO category ids <-> contiguous model
labels) and pycocotools' COCO of an annotation file."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from instseg.data.schema import read_coco_file


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


def load_coco(path: Path) -> COCO:
    """pycocotools COCO of a shape-checked file (DataError naming the file and item otherwise)."""
    return coco_from_dict(read_coco_file(path))


def coco_from_dict(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
