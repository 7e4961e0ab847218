"""`instseg data download NAME`: fetch a public dataset zip, verify it, convert it to instseg's layout.

Nothing half-written is ever left under the final name: the zip streams to DEST/.NAME.zip.part, is
checked, renamed, unpacked into a temp folder and converted (convert() itself renames into place).
A rerun after an interruption starts the download again and replaces the partial file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from instseg.data.formats import convert, detect_format
from instseg.errors import InstsegError


class DownloadError(InstsegError):
    exit_code = 1


@dataclass(frozen=True)
class RemoteDataset:
    url: str
    sha256: str | None  # None: no pinned digest yet; the digest is printed so it can be pinned
    names: str  # class names for the YOLO-seg conversion (see formats.resolve_names)


DATASETS = {
    "coco8-seg": RemoteDataset("https://github.com/ultralytics/assets/releases/download/v0.0.0/coco8-seg.zip", None, "coco80"),
    "coco128-seg": RemoteDataset("https://github.com/ultralytics/assets/releases/download/v0.0.0/coco128-seg.zip", None, "coco80"),
}


def _fetch(url: str, target: Path, progress: Callable[[str], None]) -> str:
    """Stream url to target; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                progress(f"{done / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB" if total else ""))
        if total and done != total:
            raise http.client.IncompleteRead(b"", total - done)
    except http.client.IncompleteRead:
        target.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} was cut short; run the same command again to restart it") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot download {url}: {reason}. Without network access, download the zip on another machine, "
            f"unpack it and run `instseg data convert UNPACKED DEST`"
        ) from None
    return digest.hexdigest()


def download(name: str, dest: Path, url: str | None = None, sha256: str | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """DEST/NAME as instseg's COCO layout; returns that folder (already there: nothing is fetched)."""
    if name not in DATASETS:
        raise InstsegError(f"unknown dataset '{name}' (available: {', '.join(sorted(DATASETS))})")
    remote = DATASETS[name]
    progress = progress or (lambda line: print(f"\r{name}: {line}", end="", file=sys.stderr, flush=True))
    final = dest / name
    if (final / "annotations").is_dir():
        return final
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / f".{name}.zip.part"
    got = _fetch(url or remote.url, part, progress)
    print(file=sys.stderr)
    expected = sha256 or remote.sha256
    if expected and got != expected.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: sha256 mismatch: expected {expected}, got {got}; the download was discarded")
    if not expected:
        print(f"{name}: sha256 {got} (no pinned digest: pass --sha256 to verify)", file=sys.stderr)
    archive = dest / f"{name}.zip"
    os.replace(part, archive)
    with tempfile.TemporaryDirectory(prefix=f".{name}-unpack-", dir=dest) as tmp:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            archive.unlink(missing_ok=True)
            raise DownloadError(f"{name}: not a zip archive ({exc})") from None
        root = _dataset_root(Path(tmp))
        convert(root, final, fmt=detect_format(root), names=remote.names)
    archive.unlink(missing_ok=True)
    return final


def _dataset_root(unpacked: Path) -> Path:
    """Zips usually hold one top folder (coco8-seg/...): descend into it."""
    entries = [p for p in unpacked.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return unpacked

