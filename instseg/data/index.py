"""The annotation index of a dataset split: built once per version of the split, then memory-mapped by every
process that reads it (the driver, each Train worker, each DataLoader worker, each Tune trial).

An index is a folder of flat numpy arrays plus meta.json, named after the split's fingerprint (its annotation
file's bytes and its images' names and sizes, instseg.data.index.split_fingerprint), so a changed split gets a
new index and the old one is never read for it. It lives in `data.index_cache` (default: ROOT/.instseg-index,
beside the data, so every node that sees the data sees it). Forked loader workers share the mapped pages: no
Python object per annotation exists to be copied on write, which cost 1.9 GiB per worker at COCO size.

Arrays (N images of the file, sorted by id, one row per id as pycocotools indexes them; M annotations that pass
validation, grouped by image in file order):
    image_id int64 [N], width / height int64 [N] (-1: not in the JSON), status int8 [N] (IMAGE_OK,
    IMAGE_MISSING, IMAGE_OUTSIDE), name_start int64 [N+1] + names uint8 (UTF-8 file_name of row i is
    names[name_start[i]:name_start[i+1]]), ann_start int64 [N+1] (row i's annotations are
    ann_start[i]:ann_start[i+1]);
    ann_id, position (in the file's annotation list), category_id int64 [M], bbox float32 [M, 4] (x, y, w, h as in
    the file), area float32 [M], iscrowd bool [M], crop int64 [M, 4] (x0, y0, height, width of the mask's box) +
    rle_start int64 [M+1] + rle uint8 (compressed COCO counts of the mask cropped to that box; empty for crowd
    regions, which are never training targets).
meta.json holds the categories, the counts and the validation's problems (instseg.data.validation), so that
the annotations are validated once, when the index is built.

The index is written into a temp folder and renamed into place: a crash leaves no half index, and two builders
racing for the same version both end with one whole index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from instseg.data.files import INDEX_FOLDER, apply_umask
from instseg.data.formats import annotation_path, image_file
from instseg.data.parallel import available_cores, map_chunks
from instseg.data.rle import crop_rles, to_rle
from instseg.data.schema import paused_gc, read_coco_bytes
from instseg.data.validation import (
    CHUNK,
    Problem,
    annotation_chunks,
    checked_annotations,
    merge_problems,
    scan_annotations,
)
from instseg.errors import DataError

INDEX_VERSION = 1  # bump when the arrays or the validation rules change: older indexes are then not read
META = "meta.json"
KEPT_VERSIONS = 2  # indexes of other versions of a split kept in the cache (a run that started on one may read it)
IMAGE_OK, IMAGE_MISSING, IMAGE_OUTSIDE = 0, 1, 2
ARRAYS = (
    "image_id",
    "width",
    "height",
    "status",
    "name_start",
    "names",
    "ann_start",
    "ann_id",
    "position",
    "category_id",
    "bbox",
    "area",
    "iscrowd",
    "crop",
    "rle_start",
    "rle",
)


def index_cache(root: str | Path, cache: str | Path | None = None) -> Path:
    """Where a dataset's indexes live: `cache` (data.index_cache) or ROOT/.instseg-index."""
    return Path(cache) if cache else Path(root) / INDEX_FOLDER


def _listing(folder: Path) -> bytes:
    """Each entry's name and size, sorted by name (image bytes are not read: about a second for a COCO-sized
    folder)."""
    if not folder.is_dir():
        return b""
    with os.scandir(folder) as entries:
        listed = sorted((entry.name, entry.stat().st_size) for entry in entries)
    return "".join(f"{name}:{size};" for name, size in listed).encode()


def split_fingerprint(root: str | Path, split: str) -> str:
    """sha256 of one split's annotation file and its images' names and sizes (as coco.dataset_fingerprint)."""
    return fingerprints(root, (split,))[1][split]


_FINGERPRINTS: dict[tuple, tuple[str, dict[str, str]]] = {}


def fingerprints(root: str | Path, splits: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """(the fingerprint of `splits` together, each split's own), reading each annotation file and image folder once:
    sha256 of the annotation files' bytes and each image's name and size, the first 16 hex digits. A driver asks
    several times (its indexes, its run's tag, a resume check): answers are kept while the files' sizes and
    modification times and the folders' stay the same."""
    key = (str(Path(root).resolve()), splits, *(_signature(root, split) for split in splits))
    if key not in _FINGERPRINTS:
        together, each = hashlib.sha256(), {}
        for split in splits:
            raw, listing = annotation_path(root, split).read_bytes(), _listing(Path(root) / "images" / split)
            own = hashlib.sha256(raw)
            own.update(listing)
            together.update(raw)
            together.update(listing)
            each[split] = own.hexdigest()[:16]
            # each split's own answer too: asked for alone next (its index), it is not read again
            _FINGERPRINTS[(key[0], (split,), _signature(root, split))] = (each[split], {split: each[split]})
        _FINGERPRINTS[key] = (together.hexdigest()[:16], each)
    return _FINGERPRINTS[key]


def _signature(root: str | Path, split: str) -> tuple:
    def stat(path: Path) -> tuple:
        try:
            info = path.stat()
        except OSError:
            return ()
        return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns

    return stat(annotation_path(root, split)), stat(Path(root) / "images" / split)


def index_folder(cache: Path, split: str, fingerprint: str) -> Path:
    return cache / f"{split}-{fingerprint}-v{INDEX_VERSION}"


@dataclass
class IndexBuild:
    """What ensure_index did: the index folder, whether it was built now, in how many seconds, and its counts."""

    folder: Path
    built: bool
    seconds: float
    images: int
    instances: int

    def describe(self, split: str) -> str:
        done = f"built in {self.seconds:.1f} s" if self.built else "found"
        return f"annotation index of {split}: {self.images} images, {self.instances} instances ({done}): {self.folder}"


class AnnotationIndex:
    """A built index, memory-mapped (see the module docstring for the arrays)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.meta: dict[str, Any] = json.loads((self.folder / META).read_text())
            for name in ARRAYS:
                setattr(self, name, np.load(self.folder / f"{name}.npy", mmap_mode="r"))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{self.folder}: not a readable annotation index ({exc}); delete it to rebuild it"
            ) from None

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def categories(self) -> list[dict[str, Any]]:
        return self.meta["categories"]

    def problems(self, root: str | Path) -> list[Problem]:
        """The validation's problems of the annotations, in file order, with paths below `root` (the dataset as
        the reader names it: a dataset folder may have moved, its index with it, since the index was built)."""
        return [
            Problem(kind, *self._rooted(root, location, message)) for kind, location, message in self.meta["problems"]
        ]

    def image_problems(self, root: str | Path) -> list[tuple[Problem, int]]:
        """(problem, image id) for each image entry of the file whose file is missing or outside the folder."""
        return [
            (Problem(kind, *self._rooted(root, location, message)), image_id)
            for kind, location, message, image_id in self.meta["image_problems"]
        ]

    def _rooted(self, root: str | Path, *texts: str) -> list[str]:
        built, now = self.meta.get("root", str(root)), str(root)
        return [now + text[len(built) :] if built != now and text.startswith(built) else text for text in texts]

    def file_name(self, row: int) -> str:
        return bytes(self.names[self.name_start[row] : self.name_start[row + 1]]).decode("utf-8")

    def crop_rle(self, annotation: int) -> tuple[dict[str, Any], int, int]:
        """(the annotation's mask cropped to its box as a COCO RLE, x0, y0)."""
        x0, y0, height, width = (int(v) for v in self.crop[annotation])
        counts = bytes(self.rle[self.rle_start[annotation] : self.rle_start[annotation + 1]])
        return {"size": [height, width], "counts": counts}, x0, y0

    def row_of(self, image_id: int) -> int:
        row = int(np.searchsorted(self.image_id, image_id))
        if row >= len(self.image_id) or int(self.image_id[row]) != image_id:
            raise KeyError(image_id)
        return row


def _index_chunk(start: int, anns: list, sizes: np.ndarray, category_ids: set) -> dict[str, Any]:
    """Validate one chunk and, for the annotations that pass, collect their index fields and cropped masks."""
    pairs = sizes.tolist()
    known = [offset for offset, (width, _) in enumerate(pairs) if width >= 0]  # the others: scan_annotations's
    checked = checked_annotations([anns[i] for i in known], [tuple(pairs[i]) for i in known], category_ids)
    found: dict[int, list[tuple[str, str]]] = {}
    kept: list[int] = []
    rles: list[dict[str, Any]] = []
    cropped: list[int] = []
    for offset, (problems, rle) in zip(known, checked):
        if problems:
            found[start + offset] = problems
            continue
        ann, (width, height) = anns[offset], pairs[offset]
        kept.append(offset)
        if not ann.get("iscrowd", 0) and width and height:
            rles.append(rle if rle is not None else to_rle(ann["segmentation"], height, width))
            cropped.append(len(kept) - 1)
    chosen = [anns[offset] for offset in kept]
    crops = crop_rles(rles)
    crop = np.zeros((len(kept), 4), dtype=np.int64)
    counts: list[bytes] = [b""] * len(kept)
    for index, at in enumerate(cropped):
        crop[at] = (crops.x0[index], crops.y0[index], crops.height[index], crops.width[index])
        counts[at] = crops.counts[index]
    return {
        "found": found,
        "position": np.array([start + offset for offset in kept], dtype=np.int64),
        "ann_id": np.array([ann["id"] for ann in chosen], dtype=np.int64),
        "image_id": np.array([ann["image_id"] for ann in chosen], dtype=np.int64),
        "category_id": np.array([ann["category_id"] for ann in chosen], dtype=np.int64),
        "bbox": np.array([ann["bbox"] for ann in chosen], dtype=np.float32).reshape(-1, 4),
        "area": np.array([ann["area"] for ann in chosen], dtype=np.float32),
        "iscrowd": np.array([bool(ann.get("iscrowd", 0)) for ann in chosen], dtype=bool),
        "crop": crop,
        "counts": counts,
    }


def _flat(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(starts [n+1], bytes) of byte strings laid end to end."""
    starts = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=starts[1:])
    return starts, np.frombuffer(b"".join(parts), dtype=np.uint8)


def _image_arrays(coco: dict[str, Any], image_dir: Path, source: str) -> tuple[dict[str, np.ndarray], list[list[Any]]]:
    """The image rows (one per id, the last entry of an id winning as in pycocotools, sorted by id) and the
    [kind, location, message, image id] of each entry whose file is missing or outside the image folder."""
    rows: dict[int, dict[str, Any]] = {}
    problems: list[list[Any]] = []
    status_of: dict[int, int] = {}
    for image in coco["images"]:
        rows[image["id"]] = image
        located = image_file(image_dir, image.get("file_name"))
        if located is None:
            why = "file_name must be a relative path inside the image folder"
            problems.append(["image_outside_dataset", f"{source}: image id {image['id']}", why, image["id"]])
            status_of[image["id"]] = IMAGE_OUTSIDE
        elif not located[0].is_file():
            why = f"{located[0]} does not exist"
            problems.append(["image_missing", f"{source}: image id {image['id']}", why, image["id"]])
            status_of.setdefault(image["id"], IMAGE_MISSING)
    ids = sorted(rows)
    infos = [rows[i] for i in ids]

    def pixels(info: dict[str, Any], key: str) -> int:
        return int(info[key]) if info.get(key) is not None else -1

    name_start, names = _flat([str(info.get("file_name", "")).encode("utf-8") for info in infos])
    arrays = {
        "image_id": np.array(ids, dtype=np.int64),
        "width": np.array([pixels(info, "width") for info in infos], dtype=np.int64),
        "height": np.array([pixels(info, "height") for info in infos], dtype=np.int64),
        "status": np.array([status_of.get(i, IMAGE_OK) for i in ids], dtype=np.int8),
        "name_start": name_start,
        "names": names,
    }
    return arrays, problems


ANNOTATION_FIELDS = {  # what _index_chunk returns per kept annotation, and its array when there is none
    "position": np.zeros(0, np.int64),
    "ann_id": np.zeros(0, np.int64),
    "image_id": np.zeros(0, np.int64),
    "category_id": np.zeros(0, np.int64),
    "bbox": np.zeros((0, 4), np.float32),
    "area": np.zeros(0, np.float32),
    "iscrowd": np.zeros(0, bool),
    "crop": np.zeros((0, 4), np.int64),
}


@paused_gc()
def build_index(
    root: str | Path,
    split: str,
    folder: Path,
    raw: bytes,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IndexBuild:
    """Validate the split whose annotation file's bytes are `raw` and write its index to `folder` (atomically).
    `progress(annotations done, annotations)` after each chunk; `workers` processes (default: every core)."""
    started = time.perf_counter()
    root = Path(root)
    path = annotation_path(root, split)
    source = str(path)
    coco, _ = read_coco_bytes(path, raw)
    scan = scan_annotations(coco, source)
    total = len(coco["annotations"])

    def done(chunk: int) -> None:
        if progress is not None:
            progress(min(total, (chunk + 1) * CHUNK), total)

    workers = available_cores() if workers is None else workers
    parts = map_chunks(_index_chunk, annotation_chunks(coco, scan), workers, done)
    found: dict[int, list[tuple[str, str]]] = {}
    for part in parts:
        found.update(part["found"])
    problems, _ = merge_problems(coco, source, scan, found)
    arrays, image_problems = _image_arrays(coco, root / "images" / split, source)
    joined = {
        key: np.concatenate([part[key] for part in parts]) if parts else empty
        for key, empty in ANNOTATION_FIELDS.items()
    }
    # grouped by image row, in file order within each image
    image_row = np.searchsorted(arrays["image_id"], joined["image_id"])
    order = np.argsort(image_row, kind="stable")
    for key in ANNOTATION_FIELDS:
        if key != "image_id":
            arrays[key] = joined[key][order]
    per_image = np.bincount(image_row, minlength=len(arrays["image_id"]))
    arrays["ann_start"] = np.concatenate(([0], np.cumsum(per_image))).astype(np.int64)
    counts = [counts for part in parts for counts in part["counts"]]
    arrays["rle_start"], arrays["rle"] = _flat([counts[i] for i in order.tolist()])
    meta = {
        "version": INDEX_VERSION,
        "split": split,
        "annotation_file": source,
        "root": str(root),
        "categories": [{"id": c.get("id"), "name": c.get("name")} for c in coco["categories"]],
        "images": len(arrays["image_id"]),
        "annotations": total,
        "instances": len(order),
        "problems": [[p.kind, p.location, p.message] for p in problems],
        "image_problems": image_problems,
    }
    _write_index(folder, arrays, meta)
    return IndexBuild(folder, True, time.perf_counter() - started, meta["images"], meta["instances"])


def _write_index(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Every array and meta.json into a temp folder beside `folder`, then one rename; if another process renamed
    its build of the same version first, that one stays and ours is dropped."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in ARRAYS:
            np.save(staging / f"{name}.npy", np.ascontiguousarray(arrays[name]))
        (staging / META).write_text(json.dumps(meta))
        apply_umask(staging, directory=True)
        for file in staging.iterdir():
            apply_umask(file)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / META).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prune(cache: Path, split: str, keep: Path) -> None:
    """Indexes of older versions of `split` beyond the KEPT_VERSIONS newest, and temp folders of builds that died."""
    versions = sorted(
        (p for p in cache.glob(f"{split}-*-v*") if p != keep and p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    for old in versions[:-KEPT_VERSIONS] if KEPT_VERSIONS else versions:
        shutil.rmtree(old, ignore_errors=True)
    hour = 3600
    for leftover in cache.glob(f".{split}-*"):
        if time.time() - leftover.stat().st_mtime > hour:  # a build still running is younger than that
            shutil.rmtree(leftover, ignore_errors=True)


def ensure_index(
    root: str | Path,
    split: str,
    cache: str | Path | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IndexBuild:
    """The index of the split's current version: found in the cache, or built now (see build_index)."""
    started = time.perf_counter()
    path = annotation_path(root, split)
    try:
        folder = index_folder(index_cache(root, cache), split, split_fingerprint(root, split))
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    cache_dir = folder.parent
    if (folder / META).is_file():
        meta = json.loads((folder / META).read_text())
        return IndexBuild(folder, False, time.perf_counter() - started, meta["images"], meta["instances"])
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache_dir)
        probe.close()
    except OSError as exc:
        raise DataError(
            f"cannot write the annotation index in {cache_dir} ({exc.strerror or exc}): set data.index_cache to a "
            "writable folder (on a cluster, one that every node sees)"
        ) from None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    built = build_index(root, split, folder, raw, workers, progress)
    _prune(cache_dir, split, folder)
    built.seconds = time.perf_counter() - started
    return built


def build_progress(split: str, write: Callable[[str], None]) -> Callable[[int, int], None]:
    """progress() for build_index: a bar on a terminal (stderr), else a line at every tenth of the annotations."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar: Any = None

        def draw(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc=f"indexing {split}", unit="ann", unit_scale=True, leave=False)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        return draw
    started, shown = time.perf_counter(), [0]

    def line(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0] and done < total:
            shown[0] = tenth
            elapsed = time.perf_counter() - started
            left = elapsed / done * (total - done)
            write(f"indexing {split}: {done}/{total} annotations ({10 * tenth}%), about {left:.0f} s left")

    return line
