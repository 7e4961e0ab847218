"""`instseg data download NAME`: fetch a public dataset zip, verify it, convert it to instseg's layout.

Nothing half-written is ever left under the final name: the zip streams to DEST/.NAME.zip.part, is
checked against a sha256, its unpacked size bounded, unpacked into a temp folder and converted
(convert() itself renames into place); the .part file goes whatever happens.
A rerun after an interruption starts the download again and replaces the partial file.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import shutil
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


MAX_UNPACKED_BYTES = 20 * 2**30  # a zip that claims more is refused before anything is unpacked (zip bomb)
MAX_RATIO = 200  # nor may it claim more than this many times its own size: real image datasets compress ~1x


@dataclass(frozen=True)
class RemoteDataset:
    url: str
    # None: no digest pinned yet (it must be filed from a machine that can reach the URL); such an
    # entry downloads only with --sha256 or --insecure, and prints the digest it got so it can be pinned
    sha256: str | None
    names: str  # class names for the YOLO-seg conversion (see formats.resolve_names)


DATASETS = {
    "coco8-seg": RemoteDataset(
        "https://github.com/ultralytics/assets/releases/download/v0.0.0/coco8-seg.zip", None, "coco80"
    ),
    "coco128-seg": RemoteDataset(
        "https://github.com/ultralytics/assets/releases/download/v0.0.0/coco128-seg.zip", None, "coco80"
    ),
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
    except OSError as exc:
        target.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DownloadError(f"disk full while writing {target}: free some space and run it again") from None
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot download {url}: {reason}. Without network access, download the zip on another machine, "
            f"unpack it and run `instseg data convert UNPACKED DEST`"
        ) from None
    return digest.hexdigest()


def _check_unpacked_size(archive: zipfile.ZipFile, name: str, packed: int, dest: Path) -> None:
    """Refuse a zip that would unpack to more than we allow, or than the disk holds, before writing a byte."""
    unpacked = sum(member.file_size for member in archive.infolist())
    if unpacked > MAX_UNPACKED_BYTES or unpacked > MAX_RATIO * max(packed, 1):
        claim = f"{unpacked / 1e9:.1f} GB unpacked from {packed / 1e6:.1f} MB"
        raise DownloadError(f"{name}: the zip claims {claim}; refused")
    free = shutil.disk_usage(dest).free
    if unpacked > free:
        raise DownloadError(f"disk full: {name} needs {unpacked / 1e9:.2f} GB, {dest} has {free / 1e9:.2f} GB free")


def download(
    name: str,
    dest: Path,
    url: str | None = None,
    sha256: str | None = None,
    insecure: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """DEST/NAME as instseg's COCO layout; returns that folder (already there: nothing is fetched).

    The zip must match a sha256: `sha256`, else the entry's pinned one; with neither, only `insecure`
    lets an unverified zip through."""
    if name not in DATASETS:
        raise InstsegError(f"unknown dataset '{name}' (available: {', '.join(sorted(DATASETS))})")
    remote = DATASETS[name]
    final = dest / name
    if (final / "annotations").is_dir():
        return final
    expected = sha256 or remote.sha256
    if not expected and not insecure:
        raise InstsegError(
            f"{name} has no pinned sha256 in this version: pass --sha256 HEX (the digest of the zip you trust), "
            "or --insecure to download without verifying"
        )
    progress = progress or (lambda line: print(f"\r{name}: {line}", end="", file=sys.stderr, flush=True))
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / f".{name}.zip.part"
    got = _fetch(url or remote.url, part, progress)
    print(file=sys.stderr)
    if expected and got != expected.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: sha256 mismatch: expected {expected}, got {got}; the download was discarded")
    if not expected:
        print(f"{name}: sha256 {got} (NOT verified: --insecure; pass --sha256 {got} next time)", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix=f".{name}-unpack-", dir=dest) as tmp:
            try:
                with zipfile.ZipFile(part) as zf:
                    _check_unpacked_size(zf, name, part.stat().st_size, dest)
                    zf.extractall(tmp)
            except zipfile.BadZipFile as exc:
                raise DownloadError(f"{name}: not a zip archive ({exc})") from None
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DownloadError(f"disk full while unpacking {name} into {dest}: free space and retry") from None
                raise
            root = _dataset_root(Path(tmp))
            convert(root, final, fmt=detect_format(root), names=remote.names)
    finally:
        part.unlink(missing_ok=True)
    return final


def _dataset_root(unpacked: Path) -> Path:
    """Zips usually hold one top folder (coco8-seg/...): descend into it."""
    entries = [p for p in unpacked.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return unpacked
