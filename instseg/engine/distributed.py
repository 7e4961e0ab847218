"""Validation across DDP ranks: each rank predicts its shard, rank 0 gathers every prediction and
computes the metrics, so they equal a single-process evaluation of the same model on the same data."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from instseg.config import DataConfig
from instseg.data.coco import CocoInstanceDataset
from instseg.data.loaders import shard_loader
from instseg.engine.loops import predict_into
from instseg.metrics.coco_eval import CocoEvaluator


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_predictions(evaluator: CocoEvaluator) -> None:
    """Rank 0's evaluator ends up holding the predictions of every rank."""
    rank, world = rank_and_world()
    if world == 1:
        return
    parts = [None] * world if rank == 0 else None
    dist.gather_object(evaluator.state(), parts, dst=0)
    if rank == 0:
        evaluator.merge(parts)


def evaluate_sharded(
    model: nn.Module, dataset: CocoInstanceDataset, data: DataConfig, device: torch.device, evaluator: CocoEvaluator
) -> dict[str, float] | None:
    """COCO metrics on rank 0 (None on the others); rank 0's evaluator keeps all predictions."""
    rank, world = rank_and_world()
    predict_into(model, shard_loader(dataset, data, rank, world), device, evaluator)
    gather_predictions(evaluator)
    return evaluator.compute() if rank == 0 else None
