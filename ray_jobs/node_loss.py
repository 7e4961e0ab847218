"""Why a training run stopped when nodes left the cluster: which nodes, what the run needed, how to resume."""

from __future__ import annotations

import ray
from ray.train.torch import TorchTrainer

from instseg.errors import InstsegError, first_line


class TrainingFailed(InstsegError):
    """A run that Ray Train gave up on for a reason outside the code (lost nodes)."""

    exit_code = 1


def alive_nodes() -> dict[str, str]:
    """Node id -> address of the cluster's live nodes."""
    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}


def describe_node_loss(trainer: TorchTrainer, lost: dict[str, str], error: BaseException) -> str:
    """One line: which nodes went, what the run needs to restart, and how to resume it."""
    scaling, run = trainer.scaling_config, trainer.run_config
    nodes = ", ".join(f"{node_id} ({address})" for node_id, address in lost.items())
    need = f"{scaling.num_workers} worker(s) with {scaling.resources_per_worker}"
    cause = first_line(error, 1000)
    return (
        f"training run '{run.name}' failed after losing node(s) {nodes}: the cluster could not restart "
        f"{need} (ray.max_failures={run.failure_config.max_failures}, "
        f"ray.max_startup_failures={run.failure_config.controller_failure_limit}). Once nodes are back, "
        f"rerun with run_name={run.name} to resume from its latest checkpoint. Ray said: {cause}"
    )
