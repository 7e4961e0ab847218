"""Argument parsing and error handling shared by the `python -m` entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from instseg.config import Config, load, resolve_paths
from instseg.errors import INTERRUPTED_EXIT, InstsegError, report_unexpected
from instseg.redaction import redact

# what Ray raises when the training itself failed (a worker error, lost nodes beyond max_failures)
FAILED_RUN_ERRORS = ("TrainingFailedError", "TuneError", "RayTaskError", "RayActorError")


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML run config (see configs/demo.yaml for every key)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    return resolve_paths(load(args.config, args.overrides))


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """User mistakes end as one line on stderr and their exit status, never a traceback."""
    try:
        return main(argv)
    except InstsegError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:  # noqa: BLE001 (a failed run, or our bug: one line, the traceback in a log file)
        prog = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "instseg"
        failed_run = type(exc).__name__ in FAILED_RUN_ERRORS
        return report_unexpected(exc, prog, "run failed" if failed_run else "internal error")
