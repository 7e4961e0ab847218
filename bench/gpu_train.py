"""GPU speed benchmark: instseg's training step, validation and loader against torchvision's detection
references, side by side in one process on identical batches, with one table per section.

Sections (each prints its rows as they finish; --sections picks some):
  train     images/s and peak memory of our step (instseg.engine.loops.train_one_epoch: uint8 batches from
            pinned memory, losses summed on the device) and of a torchvision-references-style loop (the
            anchor: float batches as its loader hands them over, loss.item() before backward, every loss read
            each step, SGD; torchvision's own RPN and mask paste), in the fine-tune setting (pretrained-style:
            ResNet stem and layer1 frozen, as model.trainable_backbone_layers=3 builds it) and from scratch,
            fp32 and bf16; ours/reference ratio
  levers    our fine-tune bf16 step with channels_last, batch x2 and x4 (the LR rule keeps the recipe), TF32
            and cudnn.benchmark, each against the plain one and the reference at --batch; and the reference
            given the batch x2 and channels_last levers too (--levers picks some)
  validate  eval forward + mask paste + RLE encoding, 100 detections per image: ours (batched paste on the
            device, threshold on the device, encoding in CocoEvaluator's threads) vs torchvision's (paste one
            mask at a time, outputs to the host, encode each mask) as the references' evaluate() does
  loader    coco128-seg at 640 px through instseg's real loader (0 and --loader-workers worker processes) vs
            the same batches pre-loaded, our bf16 fine-tune step
  sharing   1, 2 and 4 processes training at once on the one device (what fractional ray.gpus_per_worker
            lets Tune do): aggregate images/s, for the R50 model and the tiny preset
  profile   share of wall time the GPU is busy in our step and the reference's, and our top kernels
  compile   torch.compile of backbone + FPN on fixed-size batches: compile seconds, images/s, break-even
  syncs     the operations in one training step that make the host wait for the GPU (nonzero, item, boolean
            indexing, unique), counted for our step and the reference's by the torchvision or instseg
            function that calls them: where the GPU idles. Runs on a CPU too (same code path, except that
            torchvision's batched_nms takes its per-level branch there)

Images are synthetic (random pixels, 1-6 box-shaped instances) except in `loader`; weights are random, so no
download is needed. A GPU run of every section took 374 s on an H200; --budget-s skips what would not fit.
bench/gpu_session.sh runs it on a GPU machine without network.

    python bench/gpu_train.py [--size 800] [--batch 8] [--steps 20] [--coco128 ../shared/datasets/coco128-seg]
    python bench/gpu_train.py --device cpu --arch tiny --size 128 --batch 2 --warmup 1 --steps 2   # self-test
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from types import FrameType
from typing import Callable, Iterable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

THIS_FILE = Path(__file__).resolve()
sys.path.insert(0, str(THIS_FILE.parents[1]))

from torchvision.models.detection._utils import BoxCoder  # noqa: E402
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: E402
from torchvision.models.detection.transform import GeneralizedRCNNTransform  # noqa: E402

from instseg.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from instseg.data.coco import LabelMap  # noqa: E402
from instseg.engine.loops import batch_to_device, train_one_epoch  # noqa: E402
from instseg.engine.optim import build_optimizer  # noqa: E402
from instseg.engine.precision import resolve_precision  # noqa: E402
from instseg.metrics.coco_eval import CocoEvaluator  # noqa: E402
from instseg.models import build_model  # noqa: E402

NUM_CLASSES = 81  # COCO's 80 + background: the head size users fine-tune
SECTIONS = ("train", "validate", "levers", "compile", "loader", "profile", "sharing", "syncs")  # most wanted first
# aten operations whose result size or value the host must read, so that a GPU stream is drained first
SYNCING_OPS = {
    "aten._local_scalar_dense.default",  # .item(), int(t), bool(t)
    "aten.nonzero.default",  # torch.where(mask), boolean indexing
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.repeat_interleave.Tensor",
}
Batch = tuple[list[torch.Tensor], list[dict]]


def synthetic_batches(count: int, batch: int, size: int, seed: int = 0) -> list[Batch]:
    """`count` batches of uint8 images (size x size) with 1-6 box-shaped instances each."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images, targets = [], []
        for _ in range(batch):
            n = int(torch.randint(1, 7, (1,), generator=generator))
            xy = torch.rand(n, 2, generator=generator) * size * 0.6
            wh = torch.rand(n, 2, generator=generator) * size * 0.35 + 16
            boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
            masks = torch.zeros(n, size, size, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[i, y1:y2, x1:x2] = 1
            labels = torch.randint(1, NUM_CLASSES, (n,), generator=generator)
            images.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))
            targets.append({"boxes": boxes, "labels": labels, "masks": masks})
        batches.append((images, targets))
    return batches


def as_reference_batches(batches: list[Batch]) -> list[Batch]:
    """What the references' loader hands over: float [0, 1] images (ConvertImageDtype in the dataset)."""
    return [([image.float() / 255 for image in images], targets) for images, targets in batches]


def pinned(batches: list[Batch]) -> list[Batch]:
    """What our loader hands over on a GPU machine (data.pin_memory): uint8 images and the targets' tensors
    in pinned memory, so that copies to the device do not wait for the host."""
    return [
        (
            [image.pin_memory() for image in images],
            [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in target.items()} for target in targets],
        )
        for images, targets in batches
    ]


def reference_train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """torchvision references/detection engine.train_one_epoch, its logging and LR warm-up left out: the
    loss is read before backward and every loss again by the metric logger. Returns each step's loss."""
    model.train()
    losses_seen = []
    for images, targets in batches:
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value}")
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        for value in loss_dict.values():  # MetricLogger.update(**loss_dict_reduced) reads each one
            value.item()
        losses_seen.append(loss_value)
    return losses_seen


def as_torchvision(model: nn.Module) -> nn.Module:
    """The reference runs torchvision's own RPN, RoI heads, box coders and transform, where instseg swaps in
    level-by-level NMS and batched training targets (instseg.models.rpn, instseg.models.roi_heads), float32 box
    decoding (instseg.models.box_coding) and the batched mask paste (instseg.models.paste); the weights are the
    same."""
    model.rpn.__class__ = RegionProposalNetwork
    model.roi_heads.__class__ = RoIHeads
    model.rpn.box_coder.__class__ = BoxCoder
    model.roi_heads.box_coder.__class__ = BoxCoder
    model.transform.__class__ = GeneralizedRCNNTransform
    return model


def reference_optimizer(model: nn.Module, lr: float = 0.002) -> torch.optim.Optimizer:
    """The references' optimizer: SGD, momentum 0.9, weight decay 1e-4 (lr 0.002 here, as ours: random
    weights diverge at the references' 0.02 without their warm-up)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def our_train_config(amp: str, **keys) -> TrainConfig:
    """Our step as the product runs it: SGD at lr 0.002 (stable on random weights), gradients clipped at 10."""
    return TrainConfig(amp=amp, lr=0.002, grad_clip_norm=10.0, **keys)


def our_steps(model: nn.Module, device: torch.device, train: TrainConfig) -> Callable[[list], dict]:
    """Our training step over a list of batches (or a loader), with its own optimizer."""
    optimizer = build_optimizer(model, train)
    precision = resolve_precision(train.amp, device)
    return lambda batches: train_one_epoch(
        model,
        optimizer,
        batches,
        device,
        log_every=train.log_every,
        precision=precision,
        grad_clip_norm=train.grad_clip_norm,
    )


class Bench:
    """The sections, sharing one device, a time budget and the rows written so far."""

    def __init__(self, args: argparse.Namespace, device: torch.device, workdir: Path) -> None:
        self.args, self.device, self.workdir = args, device, workdir
        self.started = time.perf_counter()
        self.records: list[dict] = []
        self.cuda = device.type == "cuda"

    # -- helpers ---------------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def record(self, section: str, **row) -> dict:
        row = {"section": section, **row}
        self.records.append(row)
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.records, indent=1))
        return row

    def finetune_weights(self, arch: str) -> str:
        """A state-dict file, so that build_model takes the fine-tuning layout (frozen early stages)."""
        path = self.workdir / f"{arch}-weights.pt"
        if not path.exists():
            torch.save(build_model(ModelConfig(arch=arch, weights="none"), NUM_CLASSES).state_dict(), path)
        return str(path)

    def model(self, setting: str, size: int, arch: str | None = None, **overrides) -> nn.Module:
        arch = arch or self.args.arch
        weights = self.finetune_weights(arch) if setting == "fine-tune" else "none"
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, weights=weights, min_size=size, max_size=size, **overrides)
        return build_model(cfg, NUM_CLASSES).to(self.device)

    def timed(self, run: Callable[[list], object], batches: list, warmup: int) -> tuple[float, float]:
        """(images/s, peak GiB) of run(batches[warmup:]) after run(batches[:warmup])."""
        run(batches[:warmup])
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        run(batches[warmup:])
        self.sync()
        seconds = time.perf_counter() - start
        images = sum(len(images) for images, _ in batches[warmup:])
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else float("nan")
        return images / seconds, peak

    def release(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def ours(self, model: nn.Module, amp: str, batches: list, train: TrainConfig | None = None) -> tuple[float, float]:
        step = our_steps(model, self.device, train or our_train_config(amp))
        return self.timed(step, pinned(batches) if self.cuda else batches, self.args.warmup)

    def reference(self, model: nn.Module, amp: str, batches: list) -> tuple[float, float]:
        model = as_torchvision(model)
        optimizer = reference_optimizer(model)
        dtype = resolve_precision(amp, self.device).dtype
        step = lambda chunk: reference_train_steps(model, optimizer, chunk, self.device, dtype)  # noqa: E731
        return self.timed(step, as_reference_batches(batches), self.args.warmup)

    # -- sections --------------------------------------------------------------------------------------
    def train(self) -> None:
        args = self.args
        batches = synthetic_batches(args.warmup + args.steps, args.batch, args.size)
        steps = f"{args.warmup} warm-up + {args.steps} timed steps"
        print(f"\n## train: {args.arch}, {args.size} px, batch {args.batch}, {steps}")
        header = ("setting", "precision", "ours img/s", "ref img/s", "ours/ref", "ours GiB", "ref GiB")
        print(f"{header[0]:<10} " + " ".join(f"{name:>{len(name) + 1}}" for name in header[1:]))
        for setting in ("fine-tune", "scratch"):
            for amp in ("off", args.amp):
                ours, ours_peak = self.ours(self.model(setting, args.size), amp, batches)
                self.release()
                ref, ref_peak = self.reference(self.model(setting, args.size), amp, batches)
                self.release()
                self.record(
                    "train",
                    setting=setting,
                    amp=amp,
                    ours=ours,
                    reference=ref,
                    ratio=ours / ref,
                    ours_peak_gib=ours_peak,
                    reference_peak_gib=ref_peak,
                )
                values = f"{ours:>11.2f} {ref:>10.2f} {ours / ref:>8.2f}x {ours_peak:>9.2f} {ref_peak:>8.2f}"
                print(f"{setting:<10} {amp:>10} {values}", flush=True)

    def levers(self) -> None:
        args = self.args
        amp = args.amp
        base_batches = synthetic_batches(args.warmup + args.steps, args.batch, args.size, seed=1)
        ref, _ = self.reference(self.model("fine-tune", args.size), amp, base_batches)
        self.release()
        anchor = f"reference loop: {ref:.2f} img/s, batch {args.batch}"
        print(f"\n## levers: our fine-tune {amp} step, {args.size} px ({anchor})")
        print(f"{'variant':<36} {'img/s':>8} {'GiB':>6} {'vs plain':>9} {'vs ref':>7}")
        plain = None
        double = synthetic_batches(args.warmup + args.steps // 2, args.batch * 2, args.size, seed=1)
        quadruple = synthetic_batches(args.warmup + max(args.steps // 4, 1), args.batch * 4, args.size, seed=1)
        variants = [
            ("plain", {}, base_batches, {}),
            ("channels_last", {"channels_last": True}, base_batches, {}),
            ("batch x2", {}, double, {}),
            ("batch x2 + channels_last", {"channels_last": True}, double, {}),
            ("batch x4 + channels_last", {"channels_last": True}, quadruple, {}),
            ("tf32 matmuls", {}, base_batches, {"tf32": True}),
            ("cudnn.benchmark", {}, base_batches, {"cudnn_benchmark": True}),
            # the same levers given to the reference: how much of a gain is the lever and how much our step
            ("reference, batch x2", {}, double, {"reference": True}),
            ("reference, batch x2 + channels_last", {"channels_last": True}, double, {"reference": True}),
        ]
        for name, train_keys, batches, flags in variants:
            if args.levers and name not in args.levers:
                continue
            if self.left_s() < 20:
                print(f"{name:<36} skipped: over --budget-s")
                continue
            model = self.model("fine-tune", args.size)
            if train_keys.get("channels_last"):
                model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = bool(flags.get("cudnn_benchmark"))
            torch.backends.cuda.matmul.allow_tf32 = bool(flags.get("tf32"))
            try:
                if flags.get("reference"):
                    rate, peak = self.reference(model, amp, batches)
                else:
                    rate, peak = self.ours(model, amp, batches, our_train_config(amp, **train_keys))
            finally:
                torch.backends.cudnn.benchmark = False
                torch.backends.cuda.matmul.allow_tf32 = False
            del model
            self.release()
            plain = plain or rate
            self.record(
                "levers", variant=name, images_per_s=rate, peak_gib=peak, vs_plain=rate / plain, vs_ref=rate / ref
            )
            print(f"{name:<36} {rate:>8.2f} {peak:>6.2f} {rate / plain:>8.2f}x {rate / ref:>6.2f}x", flush=True)

    def validate(self) -> None:
        args = self.args
        batches = synthetic_batches(args.val_warmup + args.val_batches, args.batch, args.size, seed=2)
        label_map = LabelMap(tuple(range(1, NUM_CLASSES)), tuple(f"class{i}" for i in range(1, NUM_CLASSES)))
        dtype = resolve_precision(args.amp, self.device).dtype
        ours_model = self.model("fine-tune", args.size, box_score_thresh=0.0, box_detections_per_img=100).eval()
        reference_model = as_torchvision(copy.deepcopy(ours_model))
        counts: list[int] = []

        def forward(model: nn.Module, images: list[torch.Tensor]) -> list[dict]:
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return model(images)

        @torch.inference_mode()
        def ours(chunk: list) -> None:
            evaluator = CocoEvaluator(None, label_map)
            for images, targets in chunk:
                images, _ = batch_to_device(images, [], self.device)
                outputs = forward(ours_model, images)
                counts.extend(len(o["scores"]) for o in outputs)
                evaluator.process([{"image_id": i} for i in range(len(images))], outputs)
            evaluator.results  # noqa: B018 - waits for the encoding threads

        @torch.inference_mode()
        def reference(chunk: list) -> None:
            for images, _ in chunk:
                outputs = forward(reference_model, [image.to(self.device) for image in images])
                counts.extend(len(o["scores"]) for o in outputs)
                outputs = [{k: v.to("cpu") for k, v in o.items()} for o in outputs]
                for output in outputs:  # references coco_eval.prepare_for_segmentation
                    output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist()
                    masks = output["masks"] > 0.5
                    for mask in masks:
                        rle = mask_utils.encode(np.array(mask[0, :, :, np.newaxis].numpy(), dtype=np.uint8, order="F"))[
                            0
                        ]
                        rle["counts"].decode("utf-8")

        print(f"\n## validate: eval forward + paste + RLE, {args.size} px, batch {args.batch}, {args.amp}")
        rows = {}
        for name, run, data in (
            ("ours", ours, pinned(batches) if self.cuda else batches),
            ("torchvision", reference, as_reference_batches(batches)),
        ):
            counts.clear()
            rows[name], _ = self.timed(run, data, args.val_warmup)
            print(f"{name:<12} {rows[name]:>8.2f} img/s  ({np.mean(counts):.0f} detections per image)", flush=True)
        ratio = rows["ours"] / rows["torchvision"]
        self.record(
            "validate",
            ours=rows["ours"],
            reference=rows["torchvision"],
            ratio=ratio,
            detections_per_image=float(np.mean(counts)),
        )
        print(f"ours/torchvision: {ratio:.2f}x")

    def loader(self) -> None:
        from instseg.data.coco import CocoInstanceDataset
        from instseg.data.formats import convert
        from instseg.data.loaders import build_loader

        args = self.args
        source = Path(args.coco128)
        if not source.is_dir():
            print(f"\n## loader: skipped, no coco128-seg at {source} (--coco128)")
            return
        root = self.workdir / "coco128"
        if not root.exists():
            convert(source, root)
        dataset = CocoInstanceDataset(root, "train2017", hflip_prob=0.5)
        # fp32 on a CPU: bf16 there turns small proposals' box regression into NaN on this data
        amp = args.amp if self.cuda else "off"
        print(
            f"\n## loader: coco128-seg ({len(dataset)} images) at {args.loader_size} px, batch {args.batch}, "
            f"{amp} fine-tune step"
        )
        print(f"{'workers':>8} {'loader img/s':>13} {'pre-loaded img/s':>17} {'ratio':>7}")
        model = self.model("fine-tune", args.loader_size)
        step = our_steps(model, self.device, our_train_config(amp))
        for workers in (0, args.loader_workers):
            if self.left_s() < 30:
                print(f"{workers:>8} skipped: over --budget-s")
                continue
            data = DataConfig(root=str(root), batch_size=args.batch, num_workers=workers)
            loader = build_loader(dataset, data, shuffle=True)
            loader.sampler.set_epoch(0)
            step(loader)  # warm-up epoch: worker start, cuDNN and allocator
            self.sync()
            start = time.perf_counter()
            step(loader)
            self.sync()
            live = len(dataset) / (time.perf_counter() - start)
            preloaded_batches = list(loader)
            step(preloaded_batches)
            self.sync()
            start = time.perf_counter()
            step(preloaded_batches)
            self.sync()
            preloaded = len(dataset) / (time.perf_counter() - start)
            self.record("loader", workers=workers, loader=live, preloaded=preloaded, ratio=live / preloaded)
            print(f"{workers:>8} {live:>13.2f} {preloaded:>17.2f} {live / preloaded:>6.2f}x", flush=True)
        self.release()

    def sharing(self) -> None:
        args = self.args
        print("\n## sharing: processes training at once on one device (aggregate images/s)")
        print(f"{'model':<34} " + " ".join(f"{n:>3} proc" for n in args.sharing) + "  best")
        cases = [(args.arch, args.size, args.batch)]
        if args.arch != "tiny":
            cases.append(("tiny", args.small_size, args.batch))
        context = multiprocessing.get_context("spawn")
        for arch, size, batch in cases:
            rates = []
            for count in args.sharing:
                if self.left_s() < 40:
                    rates.append(float("nan"))
                    continue
                barrier = context.Barrier(count)
                queue = context.Queue()
                job = {
                    "arch": arch,
                    "size": size,
                    "batch": batch,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "amp": args.amp,
                    "device": str(self.device),
                    "weights": self.finetune_weights(arch),
                }
                workers = [context.Process(target=sharing_worker, args=(job, barrier, queue)) for _ in range(count)]
                for worker in workers:
                    worker.start()
                spans = [queue.get(timeout=max(60.0, self.left_s())) for _ in workers]
                for worker in workers:
                    worker.join()
                images = sum(n for n, _, _ in spans)
                rates.append(images / (max(end for _, _, end in spans) - min(start for _, start, _ in spans)))
            best = args.sharing[int(np.nanargmax(rates))] if not all(math.isnan(r) for r in rates) else None
            self.record("sharing", arch=arch, size=size, batch=batch, processes=args.sharing, images_per_s=rates)
            label = f"{arch} {size} px b{batch} {args.amp}"
            print(f"{label:<34} " + " ".join(f"{r:>8.2f}" for r in rates) + f"  {best}", flush=True)

    def profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        args = self.args
        if not self.cuda:
            print("\n## profile: skipped (CUDA only)")
            return
        batches = synthetic_batches(args.warmup + 5, args.batch, args.size, seed=3)
        print(f"\n## profile: GPU busy share of wall time, fine-tune {args.amp}, 5 steps")
        for name in ("ours", "reference"):
            model = self.model("fine-tune", args.size)
            dtype = resolve_precision(args.amp, self.device).dtype
            if name == "ours":
                data = pinned(batches)
                step = our_steps(model, self.device, our_train_config(args.amp))
            else:
                model = as_torchvision(model)
                optimizer = reference_optimizer(model)
                data = as_reference_batches(batches)
                step = lambda chunk: reference_train_steps(model, optimizer, chunk, self.device, dtype)  # noqa: E731
            step(data[: args.warmup])
            self.sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                step(data[args.warmup :])
                self.sync()
                wall = time.perf_counter() - start
            events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = merged_busy_us(events) / 1e6
            self.record("profile", loop=name, wall_s=wall, gpu_busy_s=busy, busy_share=busy / wall)
            print(f"{name:<10} wall {wall:.3f} s, GPU busy {busy:.3f} s ({100 * busy / wall:.0f}%)", flush=True)
            if name == "ours":
                averages = prof.key_averages()
                print(averages.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
                print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))

    def compile(self) -> None:
        args = self.args
        if not self.cuda and not args.compile_on_cpu:
            print("\n## compile: skipped (CUDA only; --compile-on-cpu to try it here)")
            return
        if self.left_s() < 150:
            print(f"\n## compile: skipped, {self.left_s():.0f} s of --budget-s left")
            return
        batches = synthetic_batches(args.warmup + args.steps, args.batch, args.size, seed=4)
        print(f"\n## compile: backbone + FPN, fine-tune {args.amp}, {args.size} px fixed, batch {args.batch}")
        base, _ = self.ours(self.model("fine-tune", args.size), args.amp, batches)
        self.release()
        model = self.model("fine-tune", args.size)
        model.backbone = torch.compile(model.backbone, dynamic=False)
        step = our_steps(model, self.device, our_train_config(args.amp))
        data = pinned(batches) if self.cuda else batches
        start = time.perf_counter()
        step(data[:1])
        self.sync()
        compile_s = time.perf_counter() - start
        rate, _ = self.timed(step, data[1:], max(args.warmup - 1, 1))
        saved_per_image = 1 / base - 1 / rate
        break_even = compile_s / saved_per_image if saved_per_image > 0 else float("inf")
        self.record("compile", compile_s=compile_s, base=base, compiled=rate, break_even_images=break_even)
        print(
            f"compile {compile_s:.1f} s; {base:.2f} -> {rate:.2f} img/s ({rate / base:.2f}x); "
            f"pays off after {break_even:.0f} images",
            flush=True,
        )

    def syncs(self) -> None:
        args = self.args
        batches = synthetic_batches(2, args.batch, args.size, seed=5)
        print(f"\n## syncs: operations that wait for the GPU, one fine-tune fp32 step of {args.batch} images")
        for name in ("ours", "reference"):
            model = self.model("fine-tune", args.size)
            if name == "ours":
                step, data = our_steps(model, self.device, our_train_config("off")), batches
            else:
                model, data = as_torchvision(model), as_reference_batches(batches)
                optimizer = reference_optimizer(model)
                step = lambda chunk: reference_train_steps(model, optimizer, chunk, self.device)  # noqa: E731
            step(data[:1])
            counter = SyncCounter()
            with counter:
                step(data[1:])
            total = sum(counter.calls.values())
            device_waits = self.device_syncs(step, data[1:])
            self.record("syncs", loop=name, total=total, by_function=dict(counter.calls), device_syncs=device_waits)
            where = ", ".join(f"{place} {count}" for place, count in counter.calls.most_common())
            on_device = "" if device_waits is None else f" (on the GPU, counted by CUDA: {device_waits})"
            print(f"{name:<10} {total:>4}{on_device}: {where}", flush=True)

    def device_syncs(self, step: Callable[[list], object], data: list) -> int | None:
        """Host waits in one step as CUDA counts them (torch.cuda.set_sync_debug_mode): also those the counter
        cannot see, such as NMS reading back its kept boxes and tolist()."""
        if not self.cuda:
            return None
        self.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(data)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(warning.message) for warning in caught)


# the packages whose functions a host wait is charged to; this file's own functions count too
ATTRIBUTED_PACKAGES = ("torchvision", "instseg")


def is_attributed(module: str, filename: str) -> bool:
    """Whether a frame is torchvision's, instseg's or this benchmark's: by the frame's module name (and, for this
    script, which runs as __main__ or under a test's module name, by its exact file), never by a substring of the
    path, which names every frame ours when the checkout or its .venv lives under a folder called instseg."""
    return module.split(".", 1)[0] in ATTRIBUTED_PACKAGES or _resolved(filename) == THIS_FILE


@lru_cache(maxsize=None)
def _resolved(filename: str) -> Path:
    return Path(filename).resolve()


def attribute(frames: Iterable[tuple[FrameType, int]]) -> str:
    """`file:function` of the innermost attributed frame (frames innermost first, as traceback.walk_stack gives
    them), or "?" when there is none."""
    for frame, _ in frames:
        code = frame.f_code
        if is_attributed(frame.f_globals.get("__name__", ""), code.co_filename):
            return f"{Path(code.co_filename).name}:{code.co_name}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts SYNCING_OPS (and indexing with a boolean mask) by the innermost torchvision, instseg or bench
    function on the Python stack when they run."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name == "aten.index.Tensor" and any(
            index is not None and index.dtype == torch.bool for index in args[1]
        )
        if name in SYNCING_OPS or boolean_index:
            # from the caller of this method: the dispatch itself is not where the wait comes from
            self.calls[attribute(traceback.walk_stack(sys._getframe(1)))] += 1
        return func(*args, **(kwargs or {}))


def merged_busy_us(events: list) -> float:
    """Total time (us) at least one kernel runs: kernel intervals merged, so overlaps count once."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0.0, -math.inf
    for start, stop in spans:
        if start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy


def sharing_worker(job: dict, barrier, queue) -> None:
    """One of several training processes on one device: warm up, wait for the others, time the steps."""
    device = torch.device(job["device"])
    torch.manual_seed(0)
    cfg = ModelConfig(arch=job["arch"], weights=job["weights"], min_size=job["size"], max_size=job["size"])
    model = build_model(cfg, NUM_CLASSES).to(device)
    step = our_steps(model, device, our_train_config(job["amp"]))
    batches = synthetic_batches(job["warmup"] + job["steps"], job["batch"], job["size"])
    if device.type == "cuda":
        batches = pinned(batches)
    step(batches[: job["warmup"]])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    barrier.wait()
    start = time.time()
    step(batches[job["warmup"] :])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    queue.put((job["steps"] * job["batch"], start, time.time()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--size", type=int, default=800, help="image side (px) of the synthetic batches")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16"], help="the AMP mode compared with fp32")
    parser.add_argument("--arch", default="maskrcnn_resnet50_fpn_v2")
    parser.add_argument("--levers", nargs="+", default=None, help="only these lever variants (names as printed)")
    parser.add_argument("--val-warmup", type=int, default=2, help="validation warm-up batches")
    parser.add_argument("--val-batches", type=int, default=5, help="validation timed batches")
    parser.add_argument("--coco128", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/coco128-seg"))
    parser.add_argument("--loader-size", type=int, default=640)
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--sharing", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    parser.add_argument("--small-size", type=int, default=320, help="image side for the tiny preset in `sharing`")
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("--budget-s", type=float, default=480, help="skip what would start after this many seconds")
    parser.add_argument("--json", default=None, help="also write every row to this JSON file")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: no CUDA device here; run on a GPU machine, or check the script with "
            "--device cpu --arch tiny --size 128 --batch 2 --warmup 1 --steps 2",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.arch}, {args.size} px, batch {args.batch}, {args.amp}")
    with tempfile.TemporaryDirectory(prefix="instseg-bench-") as tmp:
        bench = Bench(args, device, Path(tmp))
        for section in SECTIONS:
            if section in args.sections:
                if bench.left_s() <= 0:
                    print(f"\n## {section}: skipped, over --budget-s")
                    continue
                try:
                    getattr(bench, section)()
                except Exception as exc:  # one broken section must not cost the others (GPU time is short)
                    print(f"\n## {section}: failed: {type(exc).__name__}: {exc}", flush=True)
                    bench.release()
    print(f"\ntotal {time.perf_counter() - bench.started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
