"""Evaluate a trained model on a dataset split (the check promotion runs on challenger and champion), and
show what it predicts on one of the split's images."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from instseg.config import DataConfig
from instseg.data.coco import CocoInstanceDataset, LabelMap
from instseg.data.loaders import build_loader
from instseg.engine.loops import evaluate
from instseg.metrics.coco_eval import DEFAULT_BACKEND, Backend, CocoEvaluator
from instseg.metrics.fitness import fitness
from instseg.metrics.names import FITNESS
from instseg.metrics.plots import plot_example

EXAMPLE_SCORE = 0.5  # detections drawn on the example image
EXAMPLE_CANDIDATES = 16  # the example is the most crowded of the split's first images


def evaluate_on_split(
    model: nn.Module,
    label_map: LabelMap,
    data: DataConfig,
    split: str,
    fitness_weights: Mapping[str, float],
    device: torch.device | None = None,
    backend: Backend = DEFAULT_BACKEND,
) -> dict[str, float]:
    """COCO metrics plus FITNESS of `model` on `data.root`'s `split`."""
    device = device or torch.device("cpu")
    dataset = CocoInstanceDataset(data.root, split, label_map=label_map, on_invalid=data.on_invalid)
    evaluator = CocoEvaluator(dataset.coco, label_map, backend=backend)
    metrics = evaluate(model.to(device), build_loader(dataset, data, shuffle=False), device, evaluator)
    metrics[FITNESS] = fitness(metrics, fitness_weights)
    return metrics


@torch.inference_mode()
def render_example(model: nn.Module, label_map: LabelMap, data: DataConfig, split: str, path: Path, title: str,
                   device: torch.device | None = None) -> int:
    """Ground truth beside `model`'s detections (score >= EXAMPLE_SCORE) for the split image with the most
    instances among its first EXAMPLE_CANDIDATES, written to `path` as PNG; returns that image's id."""
    device = device or torch.device("cpu")
    dataset = CocoInstanceDataset(data.root, split, label_map=label_map, on_invalid=data.on_invalid)
    crowd = [len(dataset.coco.imgToAnns.get(image_id, [])) for image_id in dataset.image_ids[:EXAMPLE_CANDIDATES]]
    image, target = dataset[crowd.index(max(crowd))]
    output = model.eval().to(device)([image.to(device).float() / 255])[0]
    keep = output["scores"] >= EXAMPLE_SCORE
    prediction = {"masks": output["masks"][keep, 0].cpu() > 0.5, "boxes": output["boxes"][keep].cpu(),
                  "classes": (output["labels"][keep] - 1).tolist(), "scores": output["scores"][keep].tolist()}
    truth = {"masks": target["masks"].bool(), "boxes": target["boxes"], "classes": (target["labels"] - 1).tolist(),
             "scores": None}
    titles = (f"ground truth ({split} image {target['image_id']})", title)
    plot_example(image, truth, prediction, list(label_map.names), path, titles)
    return int(target["image_id"])
