"""On a cluster of several nodes, every node must reach what a run writes: ray.storage_path (the checkpoints a worker
restarted on another node restores from) and, when the tracking store is a file (sqlite), that file (rank 0 and the
Train controller log to it from whichever node they run on). A path given relative to the driver's folder, or one on
a disk of the driver's machine, is reachable from that machine only.

The driver checks it before training: it leaves a marker file in each such folder and asks a task pinned to every
other node whether the marker is there. Object-store URIs (s3://, gs://, ...) and tracking servers are not checked.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from instseg.config import Config
from instseg.errors import ConfigError
from instseg.redaction import redact
from ray_jobs.node_loss import alive_nodes

PROBE_TIMEOUT_S = 60.0
MARKER_PREFIX = ".instseg-shared-check-"


def file_store_folder(uri: str) -> str | None:
    """The folder of a file-based MLflow store (sqlite file or file store), None for a server or database URI."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return None if "://" in uri else uri


def folders_to_share(cfg: Config) -> dict[str, str]:
    """Config key -> local folder that every node of a multi-node run must see (cfg with absolute paths)."""
    folders = {}
    if "://" not in cfg.ray.storage_path:
        folders["ray.storage_path"] = cfg.ray.storage_path
    tracking_folder = file_store_folder(cfg.tracking.uri)
    if tracking_folder is not None:
        folders["tracking.uri"] = tracking_folder
    return folders


@ray.remote(num_cpus=0)
def _visible(markers: list[str]) -> list[bool]:
    return [os.path.exists(marker) for marker in markers]


def unseen_by_nodes(folders: dict[str, str], nodes: dict[str, str]) -> dict[str, list[str]]:
    """Config key -> addresses of the live `nodes` (id -> address; this driver's own is skipped) that do not see
    its folder."""
    here = ray.get_runtime_context().get_node_id()
    others = {node_id: address for node_id, address in nodes.items() if node_id != here}
    markers = {}
    for key, folder in folders.items():
        Path(folder).mkdir(parents=True, exist_ok=True)
        markers[key] = Path(folder, f"{MARKER_PREFIX}{uuid.uuid4().hex}")
        markers[key].touch()
    try:
        probes = {
            address: _visible.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
                [str(marker) for marker in markers.values()]
            )
            for node_id, address in others.items()
        }
        answered, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=PROBE_TIMEOUT_S)
        seen = {address: ray.get(probe) for address, probe in probes.items() if probe in answered}
        for address in probes.keys() - seen.keys():  # busy or going away: not a verdict on the storage
            print(
                f"note: node {address} did not answer within {PROBE_TIMEOUT_S:.0f} s whether it sees "
                f"{', '.join(folders.values())}; not checked there",
                flush=True,
            )
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    return {
        key: [address for address, visible in seen.items() if not visible[index]]
        for index, key in enumerate(markers)
        if any(not visible[index] for visible in seen.values())
    }


def check_shared_paths(cfg: Config) -> None:
    """ConfigError when a node of a multi-node cluster cannot see ray.storage_path or the sqlite tracking store."""
    nodes = alive_nodes()
    folders = folders_to_share(cfg)
    if len(nodes) < 2 or not folders:
        return
    unseen = unseen_by_nodes(folders, nodes)
    if "ray.storage_path" in unseen:
        raise ConfigError(
            f"ray.storage_path {cfg.ray.storage_path} is not shared: node(s) {', '.join(unseen['ray.storage_path'])} "
            f"of this {len(nodes)}-node cluster cannot see it, so a worker restarted there could not restore its "
            "checkpoint. Use a folder every node mounts (NFS, a shared volume) or an object-store URI (s3://, gs://)"
        )
    if "tracking.uri" in unseen:
        raise ConfigError(
            f"tracking.uri {redact(cfg.tracking.uri)} is a file on this machine that node(s) "
            f"{', '.join(unseen['tracking.uri'])} cannot reach: start `instseg tracking serve` (README: Team "
            "tracking) and set tracking.uri=http://HOST:5000"
        )
