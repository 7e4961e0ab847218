"""Writing dataset folders: built beside their destination and moved into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
