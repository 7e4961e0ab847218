"""Writing files and folders whole or not at all: built beside their destination, moved into place when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def staged_folder(destination: Path) -> Iterator[Path]:
    """A temp folder beside `destination` to build into: when the block ends normally it replaces
    `destination`; when it raises (or is interrupted) it is removed and `destination` is left as it was."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied), or a copy where linking is not possible (another file system)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def atomic_write_json(path: Path, data: Any, indent: int | None = None) -> None:
    """JSON to a temp file beside `path`, then renamed over it: a crash leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=indent)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
