"""Credentials never leave the process in clear: URIs are redacted wherever they are printed, logged to
MLflow, written to artifacts and checkpoints, or returned in a summary. The real URI lives only in memory
and in the environment handed to Ray workers."""

from __future__ import annotations

import re
from typing import Any

# the user info of a URI (everything up to its last @, so passwords holding / or @ are covered), and the
# values of query parameters that carry secrets (?token=..., S3 / Azure signed URLs)
_USER_INFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@")
_SECRET_QUERY = re.compile(
    r"([?&;](?:[A-Za-z0-9_.-]*(?:token|password|passwd|pwd|secret|signature|sig|credential|auth|api[_-]?key|"
    r"access[_-]?key|key)[A-Za-z0-9_.-]*)=)[^&#\s'\"]*",
    re.IGNORECASE,
)
REDACTED = "***"


def redact(value: Any) -> Any:
    """A string with the credentials of every URI in it replaced by ***: `user:password@` and secret query
    parameters, so that they never reach params, artifacts, checkpoints, logs or printed summaries."""
    if not isinstance(value, str):
        return value
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", _USER_INFO.sub(rf"\1{REDACTED}@", value))


def redact_tree(value: Any) -> Any:
    """redact() applied to every string in nested dicts, lists and tuples (a config dump, a summary)."""
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(item) for item in value)
    return redact(value)
