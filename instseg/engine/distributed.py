"""Collectives across DDP ranks (each a no-op in one process), and validation across them: each rank
predicts its shard, rank 0 gathers every prediction and computes the metrics, so they equal a
single-process evaluation of the same model on the same data."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from instseg.config import DataConfig
from instseg.data.coco import CocoInstanceDataset
from instseg.data.loaders import shard_loader
from instseg.engine.loops import feed_predictions
from instseg.metrics.coco_eval import CocoEvaluator


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Every rank's `values` averaged key by key (float64), on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= world
    return dict(zip(keys, tensor.tolist()))


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_predictions(evaluator: CocoEvaluator) -> None:
    """Rank 0's evaluator ends up holding the predictions of every rank."""
    rank, world = rank_and_world()
    if world == 1:
        return
    parts = [None] * world if rank == 0 else None
    dist.gather_object(evaluator.state(), parts, dst=0)
    if rank == 0:
        evaluator.merge(parts)


def sharded_coco_metrics(
    model: nn.Module, dataset: CocoInstanceDataset, data: DataConfig, device: torch.device, evaluator: CocoEvaluator
) -> dict[str, float] | None:
    """COCO metrics on rank 0 (None on the others); rank 0's evaluator keeps all predictions."""
    rank, world = rank_and_world()
    feed_predictions(model, shard_loader(dataset, data, rank, world), device, evaluator)
    gather_predictions(evaluator)
    return evaluator.compute() if rank == 0 else None
