"""Writing files and folders whole or not at all: built beside their destination, moved into place when complete.

Every file and folder we create gets the permissions the user's umask gives a plain `open()` or `mkdir`
(temp files start as 0600 / 0700, which would hide bundles and datasets from a team's shared store).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import orjson

from instseg.errors import DataError

STAGING_MARK = ".instseg-staging-"  # the name prefix of our temp folders, found and removed on the next run
_RENAME_EXCHANGE = 2  # linux/fs.h


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike[str], directory: bool = False) -> None:
    """Give `path` the mode a fresh open() (0666) or mkdir (0777) would have under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside `path` (same suffix, so writers that pick a format by name work) to write to:
    renamed over `path` when the block ends normally, removed when it raises or is interrupted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_bytes(data: Any, plain: bool = True, indent: int | None = None) -> bytes:
    """JSON of `data`. Compact output of `plain` data (no NaN or Infinity, integers within 64 bits, string keys:
    what orjson parsed, schema.parse_json) comes from orjson, ten times faster than json at COCO size."""
    if indent is None and plain:
        try:
            return orjson.dumps(data)
        except TypeError:  # a key or value orjson does not take (an int key, a big integer): json writes it
            pass
    return json.dumps(data, indent=indent).encode()


def atomic_write_json(path: str | os.PathLike[str], data: Any, indent: int | None = None, plain: bool = True) -> None:
    """JSON (json_bytes) to a temp file beside `path`, then renamed over it: a crash leaves the old file or the new
    one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(json_bytes(data, plain, indent))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def remove_stale_staging(parent: Path, name: str) -> None:
    """Temp folders an earlier, interrupted run left beside `parent/name` (never the destination itself);
    an old folder moved aside by an interrupted non-atomic swap goes back to its name first."""
    for leftover in parent.glob(f"{STAGING_MARK}{name}-*"):
        if (leftover / "old").is_dir() and not (parent / name).exists():
            os.replace(leftover / "old", parent / name)
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def staged_folder(destination: Path) -> Iterator[Path]:
    """A temp folder beside `destination` to build into: when the block ends normally it takes the place
    of `destination` in one atomic swap, and only then is the old folder deleted; when the block raises
    (or is interrupted) it is removed and `destination` is left as it was. Ctrl-C at any moment leaves
    either the old folder or the new one whole under the destination's name."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(destination.parent, destination.name)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_MARK}{destination.name}-", dir=destination.parent))
    try:
        yield staging
        # only the temp folder itself is 0700: what the block wrote already follows the umask, and
        # hard-linked images are the user's own files, whose mode is not ours to change
        apply_umask(staging, directory=True)
        if destination.exists() and _exchange(staging, destination):
            pass  # staging now holds the old folder: removed below
        elif destination.exists():
            # no atomic exchange here: the old folder moves aside whole, then the new one moves in
            aside = Path(tempfile.mkdtemp(prefix=f"{STAGING_MARK}{destination.name}-", dir=destination.parent))
            os.replace(destination, aside / "old")
            os.replace(staging, destination)
            staging = aside
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not destination.exists():  # interrupted between the two moves of the non-atomic swap: old comes back
            remove_stale_staging(destination.parent, destination.name)


INDEX_FOLDER = ".instseg-index"  # the annotation indexes of a dataset, beside its data (instseg.data.index)
MADE_BY_KEY = "instseg_made_by"  # in an annotation file's "info": the command of ours that wrote the dataset
# the "description" of synthetic datasets: our only mark on those written before MADE_BY_KEY existed
SYNTH_DESCRIPTION = "instseg synthetic shapes"


def is_our_dataset(folder: Path) -> bool:
    """A folder that one of our commands wrote and nobody added to: only annotations/ and images/ (and the
    annotation indexes we cache beside them), and its
    first annotation file says so (our mark, or for synthetic data from before the mark, our description)."""
    if {entry.name for entry in folder.iterdir()} - {"annotations", "images", INDEX_FOLDER}:
        return False
    files = sorted((folder / "annotations").glob("instances_*.json"))
    if not files:
        return False
    try:
        info = json.loads(files[0].read_text()).get("info")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(info, dict):
        return False
    return MADE_BY_KEY in info or str(info.get("description", "")).startswith(SYNTH_DESCRIPTION)


def check_destination(destination: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse to write a dataset where it would delete what we did not make: a non-empty folder that is not
    one of our outputs (unless `overwrite`), a file, or a folder that holds or lies inside a source."""
    target = destination.resolve()
    for source in sources:
        source = source.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise DataError(f"{destination}: the output folder must not be, contain or lie inside the source {source}")
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise DataError(f"{destination} exists and is not a folder: choose another output folder")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite and not is_our_dataset(destination):
        raise DataError(
            f"{destination} is not empty and was not written by instseg: choose an empty or new folder, or pass "
            "--overwrite to replace it (the old folder stays whole until the new one is complete)"
        )


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied), or a copy where linking is not possible (another file system)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
