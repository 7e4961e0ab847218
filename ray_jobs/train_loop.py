"""The Ray Train worker loop: the one training loop that plain training and every Tune trial run.

Per epoch: train (all five Mask R-CNN losses, averaged across ranks), COCO-evaluate the
validation split on rank 0 and share the result, compute FITNESS, then exactly one
`ray.train.report` with a checkpoint from rank 0 (each report blocks ~2 s in Train V2:
never report per step). Rank 0 also logs params, per-epoch metrics and the config to the MLflow
run whose id the driver passed down.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from instseg.config import Config, flatten
from instseg.data.loaders import build_datasets, build_loader, group_by_aspect_ratio
from instseg.engine.checkpoint import load_checkpoint, save_checkpoint
from instseg.engine.early_stopping import EarlyStopping
from instseg.engine.distributed import evaluate_sharded
from instseg.engine.loops import train_one_epoch, validation_loss
from instseg.engine.optim import build_optimizer, build_scheduler
from instseg.metrics.coco_eval import CocoEvaluator
from instseg.metrics.fitness import fitness
from instseg.metrics.names import EARLY_STOPPED, EPOCH, FITNESS, TRAIN_LOSS_KEYS
from instseg.metrics.report import curve_metrics, write_training_plots
from instseg.models import build_model
from instseg.tracking.runs import RunLogger


PLOTTED_IMAGES = 8  # validation images in the predictions grid
OVERLAY_SCORE = 0.25  # detections drawn on them: Ultralytics' plotting threshold


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def _from_rank_zero(value: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """loop_config: {"config": Config.model_dump(), "tracking_uri": str, "run_id": str}."""
    cfg = Config.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)

    train_set, val_set = build_datasets(cfg.data)
    label_map = train_set.label_map
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(build_model(cfg.model, label_map.num_classes))
    core = getattr(model, "module", model)  # unwrapped for eval and state dicts
    train_loader = ray.train.torch.prepare_data_loader(
        build_loader(train_set, cfg.data, shuffle=True, seed=cfg.seed), move_to_device=False
    )
    if cfg.data.aspect_ratio_grouping:
        train_loader = group_by_aspect_ratio(train_loader, train_set, cfg.data.batch_size)
    optimizer = build_optimizer(core, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, len(train_loader))

    start_epoch = 0
    stopper = EarlyStopping(cfg.train.patience, cfg.train.min_delta)
    last_curves = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            state = load_checkpoint(folder)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        stopper.load_state_dict(state.get("early_stopping", {}))

    logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if logger is not None and start_epoch == 0:
        logger.log_params({**flatten(cfg), "ray.world_size": world_size})
        logger.log_dict(cfg.model_dump(), "config.yaml")
        logger.log_dict(label_map.to_dict(), "label_map.json")
        skipped = {f"data/skipped_{split}_{kind}": n for split, ds in (("train", train_set), ("val", val_set)) for kind, n in ds.skipped.items()}
        if skipped:
            print(f"data.on_invalid=skip dropped: {skipped}", flush=True)
            logger.log_metrics(skipped, step=0)
    val_loader = build_loader(val_set, cfg.data, shuffle=False)
    evaluator = CocoEvaluator(val_set.coco, label_map)

    for epoch in range(start_epoch, cfg.train.epochs):
        started = time.perf_counter()
        sampler = train_loader.batch_sampler if cfg.data.aspect_ratio_grouping else train_loader.sampler
        if world_size > 1 and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        progress = (lambda line: print(f"[epoch {epoch + 1}] {line}", flush=True)) if rank == 0 else None
        train_metrics = _mean_across_ranks(
            train_one_epoch(model, optimizer, train_loader, device, scheduler, cfg.train.log_every, progress)
        )
        # every rank predicts its shard of the validation set; rank 0 gathers them and computes
        coco_metrics = evaluate_sharded(core, val_set, cfg.data, device, evaluator)
        if rank == 0:
            curve_values, last_curves = _curve_metrics(val_set, evaluator)
            val_metrics = {**coco_metrics, **curve_values, **validation_loss(core, val_loader, device)}
        val_metrics = _from_rank_zero(val_metrics if rank == 0 else None)
        fit = fitness(val_metrics, cfg.metrics.fitness_weights)
        stop = stopper.step(fit, epoch + 1)  # the same on every rank: metrics come from rank 0
        metrics = {
            EPOCH: epoch + 1,
            **train_metrics,
            **val_metrics,
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/epoch_time_s": time.perf_counter() - started,
            EARLY_STOPPED: float(stop),
            FITNESS: fit,
        }
        if logger is None:
            ray.train.report(metrics)
        else:
            _log_epoch(logger, metrics, cfg, epoch + 1)
            if stop or epoch + 1 == cfg.train.epochs:
                # before the last report: under Tune that report ends the trial and its workers
                _log_plots(logger, last_curves, label_map, val_set, evaluator)
            _checkpoint_and_report(logger, metrics, cfg, stopper, core, optimizer, scheduler, label_map, epoch + 1)
        if stop:
            break


def _curve_metrics(val_set: Any, evaluator: CocoEvaluator) -> tuple[dict[str, float], tuple[Any, Any]]:
    """P / R / F1 / Dice of the masks (Ultralytics definitions) from the predictions just evaluated."""
    values, curves, matrix = curve_metrics(val_set.coco, evaluator.results, "segm")
    return values, (curves, matrix)


def _log_plots(logger: RunLogger, curves_and_matrix: tuple[Any, Any], label_map: Any, val_set: Any, evaluator: CocoEvaluator) -> None:
    """Rank 0, at the last epoch: confusion matrix, curves, loss curves and validation overlays to MLflow."""
    curves, matrix = curves_and_matrix
    history = {key: logger.history(key) for key in ("train/loss", "val/loss", *(f"train/{k}" for k in TRAIN_LOSS_KEYS))}
    samples = []
    for index in range(min(PLOTTED_IMAGES, len(val_set))):
        image, target = val_set[index]
        samples.append((image, [r for r in evaluator.results if r["image_id"] == target["image_id"]]))
    with tempfile.TemporaryDirectory(prefix="instseg-plots-") as folder:
        for path in write_training_plots(Path(folder), curves, matrix, label_map, history, samples, score=OVERLAY_SCORE):
            logger.log_artifact(path, "plots")


def _log_epoch(logger: RunLogger, metrics: dict[str, float], cfg: Config, epoch: int) -> None:
    """Rank 0: the epoch's metrics to MLflow and a progress line."""
    logger.log_metrics(metrics, step=epoch)
    print(
        f"epoch {epoch}/{cfg.train.epochs}: train/loss {metrics['train/loss']:.4f} val/loss {metrics['val/loss']:.4f} "
        f"val/segm_map {metrics['val/segm_map']:.4f} {FITNESS} {metrics[FITNESS]:.4f} ({metrics['train/epoch_time_s']:.1f} s)",
        flush=True,
    )


def _checkpoint_and_report(logger: RunLogger, metrics: dict[str, float], cfg: Config, stopper: EarlyStopping, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: Any, label_map: Any, epoch: int) -> None:
    """Rank 0: the checkpoint with the one report of the epoch, and why training stops when it does."""
    with tempfile.TemporaryDirectory(prefix="instseg-ckpt-") as folder:
        save_checkpoint(
            Path(folder),
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            config=cfg.model_dump(),
            label_map=label_map.to_dict(),
            metrics=metrics,
            early_stopping=stopper.state_dict(),
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=f"epoch_{epoch:04d}")
    if metrics[EARLY_STOPPED]:
        print(f"early stopping: {stopper.reason}", flush=True)
        logger.set_tags({"instseg.early_stopped": "true", "instseg.stop_reason": stopper.reason, "instseg.stopped_epoch": epoch})
