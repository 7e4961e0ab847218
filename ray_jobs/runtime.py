"""Connecting to Ray: a cluster when an address is given, else a private local instance."""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

import ray

# Orchestration layers (trial drivers, flow tasks) hold a sliver of CPU so that only Train
# workers hold whole CPUs/GPUs: nested whole-CPU requests deadlock small machines.
ORCHESTRATION_CPUS = 0.01

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # read by ray.init when it starts a local instance


def init_ray(address: str | None = None, **kwargs) -> None:
    """address > RAY_ADDRESS (set by `ray job submit`) > a new local instance.

    A bare `ray.init()` would join whatever cluster the last `ray start --head` recorded, even a
    dead one; the local single-GPU / CPU mode asks for address="local" explicitly."""
    if ray.is_initialized():
        return
    target = ray_target(address)
    if target == "local":
        start_local_ray(**kwargs)
    else:
        ray.init(address=target, log_to_driver=True, **kwargs)
    stop_on_sigterm()


def ray_target(address: str | None = None) -> str:
    """Which Ray a driver joins: `address` > RAY_ADDRESS (set by `ray job submit`) > "local" (a private instance)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def start_local_ray(**kwargs: Any) -> None:
    """A private local instance whose every process knows its address.

    Ray Train's PlacementGroupCleaner (and anything else that calls Ray's state API without an address) looks
    for "the" local cluster; beside another instance on the same machine (a `ray start --head`, a second
    training) it picked the other one, decided that our controller was dead and exited, so our run lost
    its cleanup (and could have lost its placement group). Choosing the GCS port up front lets RAY_ADDRESS
    point every worker of this instance at it."""
    port = _free_port()
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {
        **runtime_env.get("env_vars", {}),
        "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}",
        # one node is preempted whole: Ray Train's preemption watcher has nothing to watch here, and starting it
        # prints a spurious core_worker error ("constructor arguments in the object store") on every run
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    previous = os.environ.get(GCS_PORT_VARIABLE)
    os.environ[GCS_PORT_VARIABLE] = str(port)
    try:
        ray.init(address="local", log_to_driver=True, runtime_env=runtime_env, **kwargs)
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_VARIABLE, None)
        else:
            os.environ[GCS_PORT_VARIABLE] = previous


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a scheduler, `kill`) ends a driver the way Ctrl-C does: its runs are closed as
    KILLED with the resume hint. Ray's own handler, installed by ray.init, prints a native stack dump and
    aborts, which reads like a crash."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
