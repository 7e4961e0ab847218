"""Evaluate a trained model on a dataset split (the check promotion runs on challenger and champion, and
`instseg val`), and show what it predicts on one of the split's images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from instseg.config import DataConfig
from instseg.data.coco import CocoInstanceDataset, LabelMap
from instseg.data.files import atomic_write_json
from instseg.data.formats import annotation_path
from instseg.data.loaders import build_loader
from instseg.data.schema import paused_gc
from instseg.engine.loops import coco_metrics
from instseg.errors import DataError
from instseg.metrics.coco_eval import DEFAULT_BACKEND, Backend, CocoEvaluator
from instseg.metrics.fitness import fitness
from instseg.metrics.names import FITNESS
from instseg.metrics.plots import drawable, plot_example, target_drawable

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
    metrics = coco_metrics(model.to(device), build_loader(dataset, data, shuffle=False), device, evaluator)
    metrics[FITNESS] = fitness(metrics, fitness_weights)
    return metrics


@torch.inference_mode()
def render_example(
    model: nn.Module,
    label_map: LabelMap,
    data: DataConfig,
    split: str,
    path: Path,
    title: str,
    device: torch.device | None = None,
) -> int:
    """Ground truth beside `model`'s detections (score >= EXAMPLE_SCORE) for the split image with the most
    instances among its first EXAMPLE_CANDIDATES, written to `path` as PNG; returns that image's id."""
    device = device or torch.device("cpu")
    dataset = CocoInstanceDataset(data.root, split, label_map=label_map, on_invalid=data.on_invalid)
    crowd = dataset.instance_counts()[:EXAMPLE_CANDIDATES].tolist()
    image, target = dataset[crowd.index(max(crowd))]
    output = model.eval().to(device)([image.to(device).float() / 255])[0]
    prediction = drawable(output, EXAMPLE_SCORE)
    truth = target_drawable(target)
    titles = (f"ground truth ({split} image {target['image_id']})", title)
    plot_example(image, truth, prediction, list(label_map.names), path, titles)
    return int(target["image_id"])


@paused_gc()  # the predictions are hundreds of thousands of dicts at COCO size
def score_model(
    model: str,
    root: Path,
    split: str,
    out: Path,
    iou_type: str = "segm",
    device: str = "auto",
    batch_size: int = 4,
    conf: float = 0.25,
    iou: float = 0.45,
    backend: Backend = DEFAULT_BACKEND,
    ultralytics: bool = False,
) -> tuple[dict[str, Any], list[Path]]:
    """`instseg val`: `model` (a bundle folder or a checkpoint) predicts `root`'s `split`, scored as
    `instseg metrics` scores a results file; predictions.json, metrics.json and the plots go to `out`.
    `conf` and `iou` are the confusion matrix's thresholds; `ultralytics` scores P / R / F1 as Ultralytics does."""
    from instseg.config import MetricsConfig
    from instseg.metrics.report import score_results, write_report
    from instseg.predict import load_model, predict_paths, resolve_device

    target = resolve_device(device)
    dataset = CocoInstanceDataset(root, split)
    net, label_map = load_model(model)
    unknown = sorted(set(label_map.category_ids) - set(dataset.label_map.category_ids))
    if unknown:
        raise DataError(
            f"{annotation_path(root, split)}: the model predicts category ids {unknown} that it does not have "
            f"(model classes: {', '.join(label_map.names)}; dataset: {', '.join(dataset.label_map.names)})"
        )
    paths = [dataset.image_path(image_id) for image_id in dataset.image_ids]
    results = predict_paths(net, label_map, paths, dataset.image_ids, target, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "predictions.json", results)
    weights = MetricsConfig().fitness_weights
    report, curves, matrix = score_results(dataset.coco, results, iou_type, weights, conf, iou, backend, ultralytics)
    names = [dataset.coco.cats[c]["name"] for c in sorted(dataset.coco.getCatIds())]
    return report, [out / "predictions.json", *write_report(out, report, curves, matrix, names)]
