"""Dataset formats users bring, read into COCO dicts and written as instseg's COCO layout.

    coco       ROOT/annotations/instances_{split}.json, images in ROOT/images/{split}/ or ROOT/{split}/
    roboflow   ROOT/{split}/_annotations.coco.json beside the split's images ("valid" -> "val")
    yolo       Ultralytics YOLO-seg: ROOT/images/{split}/*.jpg + ROOT/labels/{split}/*.txt, one instance per
               line `class x1 y1 x2 y2 ...` normalised to [0, 1]; class names from a data yaml (`names:`)

Every reader returns {split: SplitData}: a COCO dict plus where each image file lives. YOLO lines keep
their origin (`label file:line`) so that `data check` can point at them. Converting writes
DST/annotations/instances_{split}.json + DST/images/{split}/ through a temp folder and a rename.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from instseg.data.files import MADE_BY_KEY, atomic_write_json, check_destination, link_or_copy, staged_folder
from instseg.data.schema import paused_gc, read_coco_bytes, read_file_bytes
from instseg.errors import DataError

FORMATS = ("coco", "roboflow", "yolo")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ROBOFLOW_JSON = "_annotations.coco.json"
SOURCE_KEY = "instseg_source"  # an annotation's origin in a non-COCO source (file:line)

# The 80 COCO class names in Ultralytics' order (class index i -> names[i]); COCO8/128-seg use them.
COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


@dataclass
class SplitData:
    coco: dict[str, Any]
    image_files: dict[int, Path]  # image id -> file
    orphan_labels: list[Path] = field(default_factory=list)  # YOLO label files without an image
    unlabeled_images: list[Path] = field(default_factory=list)  # YOLO images without a label file
    relative_names: dict[int, str] = field(default_factory=dict)  # image id -> file_name below its image folder
    outside: dict[int, str] = field(default_factory=dict)  # image id -> a file_name that leaves the image folder
    plain: bool = False  # orjson can write coco back unchanged (schema.parse_json); YOLO's floats may be NaN


def image_file(image_dir: Path, file_name: Any) -> tuple[Path, str] | None:
    """(path, normalised relative name) of an image's `file_name` below `image_dir`; None for a name that
    is absolute, climbs out with `..`, or is not a string: a dataset never reads or copies files from
    elsewhere on the machine (checked on the name, so a symlinked image folder still works)."""
    if not isinstance(file_name, str) or not file_name or "\x00" in file_name:
        return None
    relative = posixpath.normpath(file_name.replace("\\", "/"))
    if posixpath.isabs(relative) or relative == ".." or relative.startswith("../") or relative == ".":
        return None
    return image_dir / relative, relative


def _index_images(coco: dict[str, Any], image_dir: Path, plain: bool = False) -> SplitData:
    data = SplitData(coco, {}, plain=plain)
    for image in coco["images"]:
        found = image_file(image_dir, image.get("file_name"))
        if found is None:
            data.outside[int(image["id"])] = str(image.get("file_name"))
        else:
            data.image_files[int(image["id"])], data.relative_names[int(image["id"])] = found
    return data


def detect_format(root: Path) -> str:
    if available_splits(root):
        return "coco"
    if list(root.glob(f"*/{ROBOFLOW_JSON}")):
        return "roboflow"
    if (root / "labels").is_dir() and (root / "images").is_dir():
        return "yolo"
    raise DataError(
        f"{root}: no known dataset layout (COCO annotations/instances_*.json, Roboflow */{ROBOFLOW_JSON}, "
        "or YOLO-seg images/ + labels/); pass --format to force one"
    )


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header (no decode); None if the file cannot be opened."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None


def annotation_path(root: str | Path, split: str) -> Path:
    """instseg's COCO layout: ROOT/annotations/instances_{split}.json."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def available_splits(root: str | Path) -> list[str]:
    """The splits of instseg's COCO layout at ROOT: those with an annotations/instances_{split}.json, sorted."""
    files = (Path(root) / "annotations").glob("instances_*.json")
    return sorted(file.name[len("instances_") : -len(".json")] for file in files)


def read_coco(root: Path) -> dict[str, SplitData]:
    splits = {}
    for split in available_splits(root):
        ann_file = root / "annotations" / f"instances_{split}.json"
        image_dir = next((d for d in (root / "images" / split, root / split) if d.is_dir()), root / "images" / split)
        coco, plain = read_coco_bytes(ann_file, read_file_bytes(ann_file))
        splits[split] = _index_images(coco, image_dir, plain)
    return splits


def read_roboflow(root: Path) -> dict[str, SplitData]:
    splits = {}
    for ann_file in sorted(root.glob(f"*/{ROBOFLOW_JSON}")):
        split = "val" if ann_file.parent.name == "valid" else ann_file.parent.name
        coco, plain = read_coco_bytes(ann_file, read_file_bytes(ann_file))
        splits[split] = _index_images(coco, ann_file.parent, plain)
    return splits


def find_yolo_names(root: Path) -> list[str] | None:
    """Class names from a data yaml in ROOT or beside it (`names:` as a list or {index: name})."""
    for candidate in sorted(root.glob("*.yaml")) + sorted(root.parent.glob(f"{root.name}*.yaml")):
        try:
            data = yaml.safe_load(candidate.read_text())
        except (OSError, yaml.YAMLError):
            continue
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names, key=int)]
        if isinstance(names, list):
            return [str(n) for n in names]
    return None


def resolve_names(root: Path, names: str | None) -> list[str]:
    """--names: a yaml file, `coco80`, or comma-separated names; default: the data yaml, else COCO80."""
    if names == "coco80":
        return list(COCO80)
    if names and Path(names).is_file():
        found = find_yolo_names(Path(names).parent) if Path(names).suffix in (".yaml", ".yml") else None
        if found is None:
            raise DataError(f"{names}: no `names:` list in this yaml")
        return found
    if names:
        return [n.strip() for n in names.split(",") if n.strip()]
    # Ultralytics' COCO-derived sets (coco8-seg, coco128-seg) ship without their yaml: COCO order
    return find_yolo_names(root) or list(COCO80)


def _parse_yolo_line(line: str) -> tuple[int | None, list[float] | None, str | None]:
    """(class, normalised coordinates, problem)."""
    parts = line.split()
    try:
        cls = int(parts[0])
        coords = [float(v) for v in parts[1:]]
    except (ValueError, IndexError):
        return None, None, f"not numbers: '{line[:60]}'"
    return cls, coords, None


def read_yolo(root: Path, names: list[str]) -> dict[str, SplitData]:
    splits = {}
    image_id, ann_id = 1, 1
    categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(names)]
    split_dirs = sorted(
        {d.name for d in (root / "images").iterdir() if d.is_dir()}
        | {d.name for d in (root / "labels").iterdir() if d.is_dir()}
    )
    for split in split_dirs:
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        images = (
            sorted(p for p in image_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if image_dir.is_dir() else []
        )
        labels = {p.stem: p for p in label_dir.glob("*.txt")} if label_dir.is_dir() else {}
        coco: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
        data = SplitData(coco, {})
        for path in images:
            size = _image_size(path)
            width, height = size if size else (0, 0)
            coco["images"].append({"id": image_id, "file_name": path.name, "width": width, "height": height})
            data.image_files[image_id] = path
            label = labels.pop(path.stem, None)
            if label is None:
                data.unlabeled_images.append(path)
            else:
                for number, line in enumerate(label.read_text().splitlines(), start=1):
                    if not line.strip():
                        continue
                    cls, coords, problem = _parse_yolo_line(line)
                    ann: dict[str, Any] = {
                        "id": ann_id,
                        "image_id": image_id,
                        "iscrowd": 0,
                        SOURCE_KEY: f"{label}:{number}",
                    }
                    if problem:
                        ann.update(
                            {
                                "category_id": -1,
                                "segmentation": [],
                                "bbox": [0, 0, 0, 0],
                                "area": 0.0,
                                "instseg_problem": problem,
                            }
                        )
                    else:
                        pixels = [v * (width if i % 2 == 0 else height) for i, v in enumerate(coords)]
                        ann.update({"category_id": cls + 1, "segmentation": [pixels], **polygon_box_and_area([pixels])})
                    coco["annotations"].append(ann)
                    ann_id += 1
            image_id += 1
        data.orphan_labels = sorted(labels.values())
        splits[split] = data
    return splits


def polygon_box_and_area(polygons: list[list[float]]) -> dict[str, Any]:
    """COCO bbox [x, y, w, h] and shoelace area of polygon coordinates (NaN-safe: NaN stays NaN)."""
    xs = [v for poly in polygons for v in poly[0::2]]
    ys = [v for poly in polygons for v in poly[1::2]]
    if not xs or not ys:
        return {"bbox": [0.0, 0.0, 0.0, 0.0], "area": 0.0}
    area = 0.0
    for poly in polygons:
        points = list(zip(poly[0::2], poly[1::2]))
        area += abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2
    return {"bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], "area": area}


def read_dataset(root: Path, fmt: str | None = None, names: str | None = None) -> tuple[str, dict[str, SplitData]]:
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    fmt = fmt or detect_format(root)
    if fmt == "coco":
        return fmt, read_coco(root)
    if fmt == "roboflow":
        return fmt, read_roboflow(root)
    if fmt == "yolo":
        return fmt, read_yolo(root, resolve_names(root, names))
    raise DataError(f"unknown format '{fmt}' (allowed: {', '.join(FORMATS)})")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@paused_gc()
def convert(
    src: Path, dst: Path, fmt: str | None = None, names: str | None = None, overwrite: bool = False
) -> dict[str, dict[str, int]]:
    """Any supported layout -> instseg's COCO layout at DST (written atomically). Returns counts per split.

    DST must be new, empty or an earlier output of ours (else `overwrite`). Images keep their folder
    below the split's image folder, so equal file names in different folders stay different images."""
    check_destination(dst, overwrite, sources=(src,))
    fmt, splits = read_dataset(src, fmt, names)
    if not splits:
        raise DataError(f"{src}: no splits found")
    counts = {}
    with staged_folder(dst) as staging:
        for split, data in splits.items():
            image_dir = staging / "images" / split
            image_dir.mkdir(parents=True)
            images = []
            for image in data.coco["images"]:
                source = data.image_files.get(int(image["id"]))
                if source is None or not source.is_file():
                    continue
                relative = data.relative_names.get(int(image["id"]), source.name)
                target = image_dir / relative
                if not target.exists():  # two entries may name the same file
                    target.parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(source, target)
                images.append({**image, "file_name": relative})
            kept_ids = {img["id"] for img in images}
            annotations = [
                {k: _json_safe(v) for k, v in ann.items() if k not in (SOURCE_KEY, "instseg_problem")}
                for ann in data.coco["annotations"]
                if ann.get("image_id") in kept_ids
            ]
            info = data.coco.get("info") if isinstance(data.coco.get("info"), dict) else {}
            coco = {
                **{k: v for k, v in data.coco.items() if k not in ("info", "images", "annotations")},
                "info": {**info, MADE_BY_KEY: f"instseg data convert ({fmt})"},
                "images": images,
                "annotations": annotations,
            }
            (staging / "annotations").mkdir(exist_ok=True)
            atomic_write_json(staging / "annotations" / f"instances_{split}.json", coco, plain=data.plain)
            used = {a["category_id"] for a in annotations}
            counts[split] = {"images": len(images), "instances": len(annotations), "classes": len(used)}
    return counts
