"""User-facing errors: entry points print `str(error)` on one line and exit with `exit_code`."""

from __future__ import annotations


class InstsegError(Exception):
    """A mistake in the user's input (config, paths, data); never shown as a traceback."""

    exit_code = 2


class ConfigError(InstsegError):
    """An unknown config key, a wrong value type, or an unreadable config file."""


class DataError(InstsegError):
    """A dataset that is missing or cannot be read as COCO instance segmentation."""
