"""Connecting to Ray: a cluster when an address is given, else a private local instance."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import ray


def init_ray(address: str | None = None, **kwargs) -> None:
    """address > RAY_ADDRESS (set by `ray job submit`) > a new local instance.

    A bare `ray.init()` would join whatever cluster the last `ray start --head` recorded, even a
    dead one; the local single-GPU / CPU mode asks for address="local" explicitly."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=target, log_to_driver=True, **kwargs)
    stop_on_sigterm()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a scheduler, `kill`) ends a driver the way Ctrl-C does: its runs are closed as
    KILLED with the resume hint. Ray's own handler, installed by ray.init, prints a native stack dump and
    aborts, which reads like a crash."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
