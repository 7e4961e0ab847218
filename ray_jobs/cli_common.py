"""What the `python -m` entry points share: their config from parsed arguments and the error handling of
`instseg` (they are aliases of its commands)."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from instseg.cli import guarded
from instseg.config import Config, load, resolve_paths


def load_config(args: argparse.Namespace) -> Config:
    return resolve_paths(load(args.config, args.overrides))


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """User mistakes end as one line on stderr and their exit status, never a traceback (instseg.cli.guarded)."""
    return guarded(lambda: main(argv))
