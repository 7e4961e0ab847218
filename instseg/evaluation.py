"""Evaluate a trained model on a dataset split: the check promotion runs on challenger and champion."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from instseg.config import DataConfig
from instseg.data.coco import CocoInstanceDataset, LabelMap
from instseg.data.loaders import build_loader
from instseg.engine.loops import evaluate
from instseg.metrics.coco_eval import CocoEvaluator
from instseg.metrics.fitness import fitness
from instseg.metrics.names import FITNESS


def evaluate_on_split(
    model: nn.Module,
    label_map: LabelMap,
    data: DataConfig,
    split: str,
    fitness_weights: Mapping[str, float],
    device: torch.device | None = None,
) -> dict[str, float]:
    """COCO metrics plus FITNESS of `model` on `data.root`'s `split`."""
    device = device or torch.device("cpu")
    dataset = CocoInstanceDataset(data.root, split, label_map=label_map)
    evaluator = CocoEvaluator(dataset.coco, label_map)
    metrics = evaluate(model.to(device), build_loader(dataset, data, shuffle=False), device, evaluator)
    metrics[FITNESS] = fitness(metrics, fitness_weights)
    return metrics
