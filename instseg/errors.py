"""User-facing errors: entry points print `str(error)` on one line and exit with `exit_code`.

Anything else that escapes an entry point is our bug: `report_internal_error` keeps the traceback in a log
file and prints one line pointing at it, with exit status 1.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from pathlib import Path

from instseg.redaction import redact


class InstsegError(Exception):
    """A mistake in the user's input (config, paths, data); never shown as a traceback."""

    exit_code = 2


class ConfigError(InstsegError):
    """An unknown config key, a wrong value type, or an unreadable config file."""


class DataError(InstsegError):
    """A dataset that is missing or cannot be read as COCO instance segmentation."""


INTERNAL_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130
# what Ray raises when the training itself failed (a worker error, lost nodes beyond max_failures): exit 1, "run failed"
FAILED_RUN_ERRORS = ("TrainingFailedError", "TuneError", "RayTaskError", "RayActorError")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """What an exception says, for a one-line message: its first line, redacted and cut to `limit`
    characters, or its type's name when it says nothing (str(KeyError()) is '')."""
    text = str(exc).strip()
    return redact(text.splitlines()[0][:limit]) if text else type(exc).__name__


def crash_log_dir() -> Path:
    """$INSTSEG_LOG_DIR, else ~/.cache/instseg/crashes (XDG_CACHE_HOME honoured)."""
    if os.environ.get("INSTSEG_LOG_DIR"):
        return Path(os.environ["INSTSEG_LOG_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instseg" / "crashes"


# what the machine refused, not a bug: disk full, file too large, quota, permissions, read-only file system
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def environment_problem(exc: BaseException) -> str | None:
    """One line for an OSError the machine raised (where and why), else None."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = f" {exc.filename}" if exc.filename else ""
        return redact(f"cannot write{where}: {exc.strerror or exc}")
    return None


def report_unexpected(exc: BaseException, prog: str, what: str = "internal error") -> int:
    """The end of an entry point for anything that is not an InstsegError: the machine's refusal as one line,
    anything else through report_internal_error; both exit 1."""
    problem = environment_problem(exc)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return INTERNAL_ERROR_EXIT
    return report_internal_error(exc, prog, what)


def report_internal_error(exc: BaseException, prog: str, what: str = "internal error") -> int:
    """One line on stderr (what failed and where the traceback is), the traceback in a log file."""
    text = redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    where = "stderr below"
    try:
        folder = crash_log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"{prog.replace(' ', '-').replace('.', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log.write_text(f"{prog} {' '.join(sys.argv[1:])}\n{text}")
        where = str(log)
    except OSError:
        log = None
    summary = first_line(exc, 300) if str(exc).strip() else ""  # the type is printed beside it
    advice = "please report it with" if what == "internal error" else "see"
    print(f"{prog}: {what} ({type(exc).__name__}: {summary}), {advice} the traceback in {where}", file=sys.stderr)
    if log is None:
        print(text, file=sys.stderr)
    return INTERNAL_ERROR_EXIT
