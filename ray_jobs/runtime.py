"""Connecting to Ray: a cluster when an address is given, else a private local instance."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, **kwargs) -> None:
    """address > RAY_ADDRESS (set by `ray job submit`) > a new local instance.

    A bare `ray.init()` would join whatever cluster the last `ray start --head` recorded, even a
    dead one; the local single-GPU / CPU mode asks for address="local" explicitly."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=target, log_to_driver=True, **kwargs)
