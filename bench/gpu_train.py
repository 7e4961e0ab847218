"""GPU smoke benchmark: R50-FPN v2 Mask R-CNN training steps on one GPU with instseg's train step
(instseg.engine.loops.train_one_epoch: autocast, GradScaler, clipping), at 640 and 800 px, fp32 and
AMP side by side. Images are synthetic (random pixels, a few random box-shaped instances), so no
dataset or download is needed; weights are random (`weights=none`) unless --weights DEFAULT.

For each (size, precision): warm-up steps (cuDNN autotuning, allocator growth), then timed steps;
images/s and the peak GPU memory of the timed steps. Under 5 minutes on an H100 with the defaults.

    python bench/gpu_train.py [--sizes 640 800] [--batch 4] [--warmup 5] [--steps 20] [--amp bf16]
    python bench/gpu_train.py --device cpu --arch tiny --sizes 128 --steps 2   # check the script itself
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instseg.config import ModelConfig, TrainConfig  # noqa: E402
from instseg.engine.loops import train_one_epoch  # noqa: E402
from instseg.engine.optim import build_optimizer  # noqa: E402
from instseg.engine.precision import apply_backend_flags, resolve_precision  # noqa: E402
from instseg.models import build_model  # noqa: E402

NUM_CLASSES = 81  # COCO's 80 + background: the head size users fine-tune


def synthetic_batches(count: int, batch: int, size: int, seed: int = 0) -> list:
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
            images.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))
            targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES, (n,), generator=generator), "masks": masks})
        batches.append((images, targets))
    return batches


def measure(args: argparse.Namespace, size: int, amp: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch=args.arch, weights=args.weights, min_size=size, max_size=size)
    train_cfg = TrainConfig(lr=0.01, amp=amp, channels_last=args.channels_last, cudnn_benchmark=args.cudnn_benchmark, grad_clip_norm=10.0)
    apply_backend_flags(train_cfg)
    model = build_model(model_cfg, NUM_CLASSES).to(device)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, train_cfg)
    precision = resolve_precision(amp, device)
    batches = synthetic_batches(args.warmup + args.steps, args.batch, size)
    if device.type == "cuda" and args.pin_memory:
        batches = [([image.pin_memory() for image in images], targets) for images, targets in batches]

    def run(chunk: list) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_one_epoch(model, optimizer, chunk, device, precision=precision, grad_clip_norm=train_cfg.grad_clip_norm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    run(batches[: args.warmup])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = run(batches[args.warmup :])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"size": size, "amp": amp if precision.dtype is not None else "off", "images_per_s": args.steps * args.batch / seconds, "peak_gib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[640, 800])
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16"], help="the AMP mode compared with fp32")
    parser.add_argument("--arch", default="maskrcnn_resnet50_fpn_v2")
    parser.add_argument("--weights", default="none", help="none (random) or DEFAULT (downloads COCO weights)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--no-pin-memory", dest="pin_memory", action="store_false")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or check the script with --device cpu --arch tiny --sizes 128 --steps 2",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.arch}, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'size':>6} {'precision':>10} {'images/s':>10} {'peak GiB':>9} {'vs fp32':>8}")
    for size in args.sizes:
        base = None
        for amp in ("off", args.amp):
            row = measure(args, size, amp, device)
            base = base or row["images_per_s"]
            print(f"{size:>6} {row['amp']:>10} {row['images_per_s']:>10.2f} {row['peak_gib']:>9.2f} {row['images_per_s'] / base:>7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
