"""The Ray Train worker loop: the one training loop that plain training and every Tune trial run.

Per epoch: train (all five Mask R-CNN losses, averaged across ranks), predict the validation split
in shards and COCO-evaluate the gathered predictions on rank 0, share the result, compute FITNESS,
then exactly one `ray.train.report` with a checkpoint from rank 0. Rank 0 logs params, config,
tags and plots to the MLflow run whose id the driver passed down; the per-epoch metrics are logged
by the controller when it accepts the report (ray_jobs.epoch_logger).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from instseg.config import Config, flatten
from instseg.data.coco import dataset_fingerprint
from instseg.data.loaders import build_datasets, build_loader, group_by_aspect_ratio
from instseg.engine.checkpoint import load_checkpoint, save_checkpoint
from instseg.engine.distributed import from_rank_zero, gather_to_all, mean_across_ranks, sharded_coco_metrics
from instseg.engine.early_stopping import EarlyStopping
from instseg.engine.loops import train_one_epoch, validation_loss
from instseg.engine.optim import apply_optimizer_settings, build_optimizer, build_scheduler
from instseg.engine.precision import apply_backend_flags, resolve_precision
from instseg.engine.progress import BarProgress, LineProgress, Progress
from instseg.errors import first_line
from instseg.metrics.coco_eval import CocoEvaluator
from instseg.metrics.fitness import fitness
from instseg.metrics.names import (
    EARLY_STOPPED,
    EPOCH,
    EPOCH_TIME,
    FITNESS,
    LEARNING_RATE,
    SETUP_TIME,
    TRAIN_LOSS_KEYS,
    val_key,
)
from instseg.metrics.report import curve_metrics, write_overlay_grid, write_training_plots
from instseg.metrics.results import RESULTS_CSV, EpochTable, results_csv
from instseg.models import build_model
from instseg.redaction import redact_tree
from instseg.tracking.runs import RunLogger, quick_requests, start_system_metrics

PLOTTED_IMAGES = 8  # validation images in the predictions grid
PLOTTED_LOSSES = ("train/loss", "val/loss", *(f"train/{k}" for k in TRAIN_LOSS_KEYS))  # per epoch, in loss_curves.png
OVERLAY_SCORE = 0.25  # detections drawn on them: Ultralytics' plotting threshold
RESUMED_TAG = "instseg.resumed_from_epochs"  # every checkpoint epoch the run restarted from, in order
# every checkpoint a PBT trial continued from, in order, as <trial id>@<epoch>
CLONED_TAG = "instseg.pbt_cloned_from"
NODES_TAG = "instseg.worker_nodes"  # Ray node id of each rank, in rank order, at the latest (re)start


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """loop_config: {"config": Config.model_dump() (its tracking.uri the store), "run_id": str, "progress": "bar" |
    "lines" | "off"} (train.progress as the driver resolved it: only the driver knows whether a terminal is watching),
    and optionally "start_from": {"checkpoint": ray.train.Checkpoint, "source": trial id}: where a run without a
    checkpoint of its own starts (PBT: another trial's weights, optimizer and schedule, with this config's values),
    and "prepared": the driver's preflight's annotation index folders and dataset fingerprint (build_trainer).

    Restarted by Ray Train after a worker or node failure (and by a rerun of the same run name), it
    continues from the latest checkpoint: weights, optimizer, LR schedule, fp16 scaler, epoch and
    early-stopping state. Per-epoch metrics reach MLflow through ray_jobs.epoch_logger, in step with
    the checkpoints."""
    entered = time.perf_counter()
    cfg = Config.model_validate(loop_config["config"])
    quiet_ray_train_reports()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    apply_backend_flags()

    prepared = loop_config.get("prepared") or {}
    train_set, val_set = build_datasets(cfg.data, prepared.get("indexes"))
    label_map = train_set.label_map
    device = ray.train.torch.get_device()
    model = build_model(cfg.model, label_map.num_classes)
    if cfg.model.sync_batchnorm and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    core = getattr(model, "module", model)  # unwrapped for eval and state dicts
    # each rank its own shard (DistributedSampler, reshuffled per epoch by set_epoch below); batches
    # stay on the host until train_one_epoch moves them, uint8, to the device
    train_loader = build_loader(train_set, cfg.data, shuffle=True, seed=cfg.seed, rank=rank, world_size=world_size)
    if cfg.data.aspect_ratio_grouping:
        train_loader = group_by_aspect_ratio(train_loader, train_set, cfg.data)
    optimizer = build_optimizer(core, cfg.train, lr=cfg.effective_lr())
    scheduler = build_scheduler(optimizer, cfg.train, len(train_loader))
    precision = resolve_precision(
        cfg.train.amp, device, warn=lambda line: print(line, flush=True) if rank == 0 else None
    )
    stopper = EarlyStopping(cfg.train.patience, cfg.train.min_delta)
    logger = RunLogger(cfg.tracking.uri, loop_config["run_id"]) if rank == 0 else None

    # where each rank runs, at every (re)start: which nodes a failure took out is then on record
    nodes = gather_to_all(ray.get_runtime_context().get_node_id())
    if logger is not None:
        logger.set_tags({NODES_TAG: ",".join(nodes)})
    restored, cloned_from = ray.train.get_checkpoint(), None
    if restored is None and loop_config.get("start_from"):
        restored, cloned_from = loop_config["start_from"]["checkpoint"], loop_config["start_from"]["source"]
    system_metrics = None
    if cfg.tracking.system_metrics_s > 0 and context.get_local_rank() == 0:  # one monitor per node
        node_id = f"node_{context.get_node_rank()}" if len(set(nodes)) > 1 else None
        system_metrics = start_system_metrics(
            cfg.tracking.uri,
            loop_config["run_id"],
            cfg.tracking.system_metrics_s,
            node_id,
            resume=restored is not None,
        )

    start_epoch = 0
    # every epoch's metrics travel in the checkpoints: results.csv and the loss plots never depend on what
    # MLflow has received (during an outage, the controller holds epochs back)
    results: list[dict[str, float]] = []
    if restored is not None:
        with restored.as_directory() as folder:
            state = load_checkpoint(folder)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_settings(optimizer, scheduler, cfg.train, cfg.effective_lr())
        precision.load_scaler_state(state.get("scaler", {}))
        stopper.load_state_dict(state.get("early_stopping", {}))
        start_epoch = int(state["epoch"])
        results = list(state.get("results", []))
        if logger is not None:
            _record_resume(logger, state, cloned_from)
    elif logger is not None:
        _log_run_setup(logger, cfg, world_size, label_map, train_set, val_set)
        _log_datasets(logger, cfg, label_map, train_set, val_set, prepared.get("fingerprint"))

    val_loader = build_loader(val_set, cfg.data, shuffle=False)
    stored_config = redact_tree(cfg.model_dump())  # checkpoints and bundles travel: no credentials in them
    # the ground truth is read (pycocotools) by rank 0 alone, when it first scores an epoch
    evaluator = CocoEvaluator(lambda: val_set.coco, label_map, backend=cfg.metrics.backend)
    table = EpochTable(cfg.train.epochs)
    progress_mode = loop_config.get("progress", "lines")
    if logger is not None:
        logger.log_metrics({SETUP_TIME: time.perf_counter() - entered}, step=start_epoch)
    for epoch in range(start_epoch, cfg.train.epochs):
        started = time.perf_counter()
        sampler = train_loader.batch_sampler if cfg.data.aspect_ratio_grouping else train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
        progress = make_progress(progress_mode, epoch + 1, cfg.train.epochs) if rank == 0 else None
        train_metrics = mean_across_ranks(
            train_one_epoch(
                model,
                optimizer,
                train_loader,
                device,
                scheduler,
                cfg.train.log_every,
                progress,
                precision=precision,
                grad_clip_norm=cfg.train.grad_clip_norm,
            )
        )
        val_metrics, curves = validation_step(core, val_set, val_loader, cfg, device, evaluator)
        fit = fitness(val_metrics, cfg.metrics.fitness_weights)
        stop = stopper.step(fit, epoch + 1)  # the same on every rank: metrics come from rank 0
        metrics = {
            EPOCH: epoch + 1,
            **train_metrics,
            **val_metrics,
            LEARNING_RATE: optimizer.param_groups[0]["lr"],
            EPOCH_TIME: time.perf_counter() - started,
            EARLY_STOPPED: float(stop),
            FITNESS: fit,
        }
        last = stop or epoch + 1 == cfg.train.epochs
        results.append({key: float(value) for key, value in metrics.items()})
        if logger is not None:
            print("\n".join(table.lines(metrics)), flush=True)
            if last:
                # before the last report: under Tune that report ends the trial and its workers
                _log_plots(logger, results, curves, label_map, val_set, evaluator, metrics)
            elif cfg.train.plot_every and (epoch + 1) % cfg.train.plot_every == 0:
                _log_overlay_grid(logger, label_map, val_set, evaluator, epoch + 1)
            if stop:
                print(f"early stopping: {stopper.reason}", flush=True)
                logger.set_tags(
                    {
                        "instseg.early_stopped": "true",
                        "instseg.stop_reason": stopper.reason,
                        "instseg.stopped_epoch": epoch + 1,
                    }
                )
        state = {
            "model": core,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "epoch": epoch + 1,
            "config": stored_config,
            "label_map": label_map.to_dict(),
            "metrics": metrics,
            "early_stopping": stopper.state_dict(),
            "scaler": precision.scaler_state(),
            "results": results,
        }
        report_epoch(metrics, state if rank == 0 else None, epoch + 1)
        if stop:
            break
    if system_metrics is not None:
        system_metrics.finish()  # its last samples; on a failure its thread ends with the process


def report_epoch(metrics: dict[str, float], checkpoint_state: dict[str, Any] | None, epoch: int) -> None:
    """THE one ray.train.report of an epoch (each blocks ~2 s in Train V2: never per step); rank 0
    attaches the checkpoint, the other ranks report the same metrics without one."""
    if checkpoint_state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="instseg-ckpt-") as folder:
        save_checkpoint(Path(folder), **checkpoint_state)
        # results.csv rides with each checkpoint; the controller copies the latest beside them (ray_jobs.epoch_logger)
        (Path(folder) / RESULTS_CSV).write_text(results_csv(checkpoint_state["results"]))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=f"epoch_{epoch:04d}"
        )


def validation_step(
    core: torch.nn.Module, val_set: Any, val_loader: Any, cfg: Config, device: torch.device, evaluator: CocoEvaluator
) -> tuple[dict[str, float], Any]:
    """Validation metrics on every rank (computed on rank 0): COCO stats of the gathered shard
    predictions, mask P / R / F1 / Dice, validation losses; plus rank 0's curves (None elsewhere)."""
    # every rank predicts its shard of the validation set; rank 0 gathers them and computes
    coco_metrics = sharded_coco_metrics(core, val_set, cfg.data, device, evaluator)
    val_metrics, curves = None, None
    if coco_metrics is not None:
        curve_values, curves = _curve_metrics(val_set, evaluator, cfg.metrics.ultralytics_compat)
        val_metrics = {**coco_metrics, **curve_values, **validation_loss(core, val_loader, device)}
    return from_rank_zero(val_metrics), curves


def _log_run_setup(
    logger: RunLogger, cfg: Config, world_size: int, label_map: Any, train_set: Any, val_set: Any
) -> None:
    """Rank 0 of a fresh run: params (with the world size and the scaled LR), config, classes, skips."""
    logger.log_params(
        {
            **flatten(cfg),
            "ray.world_size": world_size,
            "train.global_batch": cfg.global_batch(),
            "train.effective_lr": cfg.effective_lr(),
            "torch.num_threads": torch.get_num_threads(),
        }
    )
    logger.log_dict(redact_tree(cfg.model_dump()), "config.yaml")
    logger.log_dict(label_map.to_dict(), "label_map.json")
    skipped = {
        f"data/skipped_{split}_{kind}": n
        for split, ds in (("train", train_set), ("val", val_set))
        for kind, n in ds.skipped.items()
    }
    if skipped:
        print(f"data.on_invalid=skip dropped: {skipped}", flush=True)
        logger.log_metrics(skipped, step=0)


def _log_datasets(
    logger: RunLogger, cfg: Config, label_map: Any, train_set: Any, val_set: Any, fingerprint: str | None
) -> None:
    """Rank 0 of a fresh run: both splits as MLflow dataset inputs (fingerprint (the driver's, when it passed it
    down), images, instances, classes)."""
    fingerprint = fingerprint or dataset_fingerprint(cfg.data.root, (cfg.data.train_split, cfg.data.val_split))
    splits = {
        context: {
            "split": name,
            "images": len(dataset),
            "instances": dataset.num_instances,
            "classes": label_map.num_classes - 1,
        }
        for context, name, dataset in (
            ("training", cfg.data.train_split, train_set),
            ("validation", cfg.data.val_split, val_set),
        )
    }
    logger.log_dataset_inputs(cfg.data.root, fingerprint, splits)


def _record_resume(logger: RunLogger, state: dict[str, Any], cloned_from: str | None) -> None:
    """Rank 0 after a restore: tag the run, and log the checkpoint's epoch if MLflow lacks it (the
    controller died between registering the checkpoint and logging it), so history has no gap. A run that
    continues another's checkpoint (`cloned_from`, PBT) keeps its own metrics of that epoch."""
    epoch = int(state["epoch"])
    if epoch not in logger.logged_steps(FITNESS):
        logger.log_metrics(state["metrics"], step=epoch)
    if cloned_from is not None:
        logger.append_tag(CLONED_TAG, f"{cloned_from}@{epoch}")
        print(f"continues from the checkpoint of epoch {epoch} of trial {cloned_from}", flush=True)
        return
    logger.append_tag(RESUMED_TAG, epoch)
    print(f"resumed from the checkpoint of epoch {epoch}", flush=True)


def _curve_metrics(val_set: Any, evaluator: CocoEvaluator, ultralytics: bool) -> tuple[dict[str, float], Any]:
    """P / R / F1 of boxes and masks, and the masks' Dice (Ultralytics definitions), from the predictions just
    evaluated; the masks' curves and confusion matrix for the plots."""
    box_values, _, _ = curve_metrics(val_set.coco, evaluator.results, "bbox", ultralytics)
    values, curves, matrix = curve_metrics(val_set.coco, evaluator.results, "segm", ultralytics)
    box_values.pop(val_key("bbox", "dice"))  # a Dice of two boxes says nothing about the masks
    return {**box_values, **values}, (curves, matrix)


def _overlay_samples(val_set: Any, evaluator: CocoEvaluator) -> list[tuple[Any, dict[str, Any], list[dict[str, Any]]]]:
    """The first PLOTTED_IMAGES validation images with their targets and the predictions just evaluated."""
    samples = []
    for index in range(min(PLOTTED_IMAGES, len(val_set))):
        image, target = val_set[index]
        samples.append((image, target, [r for r in evaluator.results if r["image_id"] == target["image_id"]]))
    return samples


def _log_plots(
    logger: RunLogger,
    results: list[dict[str, float]],
    curves_and_matrix: tuple[Any, Any],
    label_map: Any,
    val_set: Any,
    evaluator: CocoEvaluator,
    metrics: dict[str, float],
) -> None:
    """Rank 0, at the last epoch: confusion matrix, curves, loss curves and validation overlays to MLflow."""
    curves, matrix = curves_and_matrix
    losses = {key: [(int(epoch[EPOCH]), epoch[key]) for epoch in results if key in epoch] for key in PLOTTED_LOSSES}
    samples = _overlay_samples(val_set, evaluator)
    with tempfile.TemporaryDirectory(prefix="instseg-plots-") as folder:
        plots = write_training_plots(
            Path(folder),
            curves,
            matrix,
            label_map,
            losses,
            samples,
            score=OVERLAY_SCORE,
            coco_map50=metrics.get(val_key("segm", "map50")),
        )
        for path in plots:
            logger.log_artifact(path, "plots")


def _log_overlay_grid(logger: RunLogger, label_map: Any, val_set: Any, evaluator: CocoEvaluator, epoch: int) -> None:
    """Rank 0, every train.plot_every epochs: the validation grid as plots/val_predictions_epoch<N>.png. A picture
    along the way is not worth stopping for: when MLflow does not answer at once, it is left out with a line."""
    with tempfile.TemporaryDirectory(prefix="instseg-plots-") as folder:
        path = Path(folder) / f"val_predictions_epoch{epoch}.png"
        write_overlay_grid(path, _overlay_samples(val_set, evaluator), label_map, OVERLAY_SCORE)
        try:
            with quick_requests():
                logger.log_artifact(path, "plots")
        except Exception as exc:  # noqa: BLE001 (whatever the client raises for an unreachable server)
            print(
                f"MLflow unreachable: the validation grid of epoch {epoch} is not logged ({first_line(exc, 200)})",
                flush=True,
            )


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report with its whole metrics dict at INFO through a logger named after its source
    file (`logging.getLogger(__file__)`, outside `ray.train`, so RunConfig's logging_config misses it): our epoch
    table says the same. The logger is found by that module's own __file__, not by a path ending."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def make_progress(mode: str, epoch: int, epochs: int) -> Progress | None:
    """Rank 0's progress during an epoch: "bar" is drawn by the Ray driver in its terminal (tqdm_ray), "lines"
    prints a line every train.log_every steps, "off" nothing."""
    if mode == "bar":
        from ray.experimental.tqdm_ray import tqdm

        return BarProgress(epoch, epochs, tqdm)
    if mode == "lines":
        return LineProgress(epoch, epochs, lambda line: print(line, flush=True))
    return None
