"""Learning parity: our Ray Train run against a bare torchvision-references-style loop, the same model,
data, seeds, epochs, optimizer, LR schedule and batch, measured in one run.

Ours: `ray_jobs.train.run_training` (Ray Train worker, our dataset, loader, loop, validation, MLflow).
Reference (the shape of torchvision references/detection): a PIL dataset that rasterises every polygon with
pycocotools per sample and flips with `torch.rand(1) < 0.5`, a RandomSampler, a plain
`loss.backward(); optimizer.step()` loop with the LR rule written out per iteration, and evaluation with
pycocotools' COCOeval on masks thresholded at 0.5. The model comes from the same builder and seed (same
initial weights); nothing else of instseg is used on that side.

Prints each side's final segm / bbox mAP per seed, the mean difference (goal: |ours - reference| <= 0.02
in segm mAP50-95) and writes both loss curves and mAP curves into one PNG.

    .venv/bin/python bench/learning.py                       # CPU, tiny preset, synthetic data (the demo's)
    .venv/bin/python bench/learning.py --device cuda --arch maskrcnn_resnet50_fpn_v2 --data coco128-seg \\
        --weights /path/to/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth   # on a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare_data(name: str, work: Path, shared: Path) -> Path:
    """synth (the demo's 256 images), coco8-seg / coco128-seg (converted from ../shared; coco128-seg split 80/20) or
    a COCO-layout folder with train and val splits."""
    from instseg.data.coco import available_splits
    from instseg.data.formats import convert
    from instseg.data.split import split_dataset
    from instseg.data.synth import synthesize

    if name == "synth":
        synthesize(work / "synth", images=256, seed=0)
        return work / "synth"
    if name in ("coco8-seg", "coco128-seg"):
        root = work / name
        convert(shared / "datasets" / name, root, names="coco80")
        if "val" not in available_splits(root):  # coco128-seg comes as train2017 only
            split_dataset(root, val_fraction=0.2, seed=0)
        return root
    return Path(name).resolve()


class ReferenceDataset:
    """references/detection coco_utils: polygons -> full masks per sample, PIL -> float tensor, random flip."""

    def __init__(self, root: Path, split: str, flip_prob: float) -> None:
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        self.folder = root / "images" / split
        self.ids = sorted(self.coco.imgs)
        self.labels = {cat: index + 1 for index, cat in enumerate(sorted(self.coco.cats))}
        self.flip_prob = flip_prob

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image
        from torchvision.transforms.v2 import functional as F

        image_id = self.ids[index]
        image = Image.open(self.folder / self.coco.imgs[image_id]["file_name"]).convert("RGB")
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, image.width)
        boxes[:, 1::2].clamp_(0, image.height)
        masks = (
            torch.stack([torch.from_numpy(self.coco.annToMask(a)) for a in anns])
            if anns
            else torch.zeros((0, image.height, image.width), dtype=torch.uint8)
        )
        tensor = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        if torch.rand(1) < self.flip_prob:
            tensor, masks = tensor.flip(-1), masks.flip(-1)
            boxes[:, [0, 2]] = image.width - boxes[:, [2, 0]]
        labels = torch.tensor([self.labels[a["category_id"]] for a in anns], dtype=torch.int64)
        return tensor, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}


def reference_run(cfg, device: str, seed: int) -> dict[str, list[float]]:
    """The bare loop: per-epoch mean training loss and segm / bbox mAP of the validation split."""
    import numpy as np
    import torch
    from pycocotools import mask as mask_utils

    from instseg.models import build_model  # the same architecture and initial weights

    root = Path(cfg.data.root)
    torch.manual_seed(seed)
    train_set, val_set = (
        ReferenceDataset(root, cfg.data.train_split, cfg.data.hflip_prob),
        ReferenceDataset(root, cfg.data.val_split, 0.0),
    )
    model = build_model(cfg.model, len(train_set.labels) + 1).to(device)

    def collate(batch):
        return tuple(zip(*batch))

    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.effective_lr(), weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=cfg.effective_lr(), momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
        )
    total = cfg.train.epochs * len(loader)
    warmup = min(cfg.train.warmup_iters, total // 2)

    def lr_factor(step: int) -> float:  # linear warm-up from 0.1%, then cosine to 1% (or constant)
        if step < warmup:
            return 0.001 + 0.999 * step / warmup
        if cfg.train.lr_scheduler == "constant":
            return 1.0
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    history: dict[str, list[float]] = {"train/loss": [], "val/segm_map": [], "val/bbox_map": []}
    category_of = {label: cat for cat, label in train_set.labels.items()}
    for _ in range(cfg.train.epochs):
        model.train()
        losses = []
        for images, targets in loader:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            if cfg.train.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history["train/loss"].append(sum(losses) / len(losses))
        model.eval()
        results = []
        with torch.inference_mode():
            for index in range(len(val_set)):
                image, target = val_set[index]
                output = model([image.to(device)])[0]
                masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                for box, score, label, mask in zip(
                    output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist(), masks
                ):
                    rle = mask_utils.encode(np.asfortranarray(mask))
                    rle["counts"] = rle["counts"].decode()
                    results.append(
                        {
                            "image_id": target["image_id"],
                            "category_id": category_of[label],
                            "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            "segmentation": rle,
                        }
                    )
        for iou_type in ("segm", "bbox"):
            history[f"val/{iou_type}_map"].append(_coco_map(val_set.coco, results, iou_type))
    return history


def _coco_map(coco_gt, results: list[dict], iou_type: str) -> float:
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0
    kept = [{k: v for k, v in r.items() if k != ("segmentation" if iou_type == "bbox" else "bbox")} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(kept), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def our_run(cfg) -> dict[str, list[float]]:
    """ray_jobs.train on the local Ray; the per-epoch history read back from its MLflow run."""
    from instseg.tracking.runs import RunLogger
    from ray_jobs.train import run_training

    summary = run_training(cfg)
    run = RunLogger(summary.tracking_uri, summary.run_id)
    return {
        key: [value for _, value in sorted(run.history(key))] for key in ("train/loss", "val/segm_map", "val/bbox_map")
    }


def plot(histories: dict[str, list[dict[str, list[float]]]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, map_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (side, runs), colour in zip(histories.items(), ("tab:blue", "tab:orange")):
        for index, history in enumerate(runs):
            epochs = range(1, len(history["train/loss"]) + 1)
            label = side if index == 0 else None
            loss_ax.plot(epochs, history["train/loss"], color=colour, marker="o", markersize=3, label=label)
            map_ax.plot(epochs, history["val/segm_map"], color=colour, marker="o", markersize=3, label=label)
    loss_ax.set(xlabel="epoch", ylabel="train/loss (sum of the five losses)", title="training loss")
    map_ax.set(xlabel="epoch", ylabel="val/segm_map (mAP50-95)", title="mask mAP on the validation split")
    for ax in (loss_ax, map_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--arch", default="tiny", help="model.arch (default tiny)")
    parser.add_argument(
        "--data", default="synth", help="synth | coco8-seg | coco128-seg | a COCO-layout folder with train/val splits"
    )
    parser.add_argument(
        "--weights", default="none", help="model.weights: none | DEFAULT | path (official COCO file for R50 on a GPU)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default 10, the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--shared", default=str(ROOT.parent / "shared"), help="folder with datasets/ (for coco8-seg, coco128-seg)"
    )
    parser.add_argument("--out", default="bench-learning.png", help="PNG with both sides' curves")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides for both sides")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    import torch

    from instseg.config import load, resolve_paths

    work = Path(tempfile.mkdtemp(prefix="instseg-bench-learning-"))
    root = prepare_data(args.data, work, Path(args.shared))
    cpu = args.device == "cpu"
    threads = min(2, os.cpu_count() or 1) if cpu else 8
    torch.set_num_threads(threads)
    base = ROOT / "configs" / ("demo.yaml" if args.arch == "tiny" else "coco8-seg.yaml")
    ray.init(
        address="local", num_cpus=threads if cpu else os.cpu_count(), num_gpus=None if cpu else 1, log_to_driver=False
    )

    def config(seed: int):
        return resolve_paths(
            load(
                base,
                [
                    f"model.arch={args.arch}",
                    f"model.weights={args.weights}",
                    f"data.root={root}",
                    f"train.epochs={args.epochs}",
                    f"seed={seed}",
                    f"run_name=learning-{seed}",
                    f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                    "tracking.experiment=bench-learning",
                    f"ray.storage_path={work / 'ray_results'}",
                    f"ray.use_gpu={not cpu}",
                    f"ray.cpus_per_worker={threads}",
                    "data.num_workers=0",
                    "train.amp=off",
                    "train.patience=0",
                    *args.overrides,
                ],
            )
        )

    histories: dict[str, list[dict[str, list[float]]]] = {"ours (Ray Train)": [], "reference loop": []}
    for seed in args.seeds:
        cfg = config(seed)
        started = time.perf_counter()
        histories["ours (Ray Train)"].append(our_run(cfg))
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        histories["reference loop"].append(reference_run(cfg, args.device, seed))
        ref_s = time.perf_counter() - started
        ours, ref = (h[-1] for h in histories.values())
        segm, bbox = (f"{ours[key][-1]:.4f} vs {ref[key][-1]:.4f}" for key in ("val/segm_map", "val/bbox_map"))
        print(
            f"seed {seed}: final mAP50-95 ours vs reference: segm {segm}, bbox {bbox} "
            f"(ours {ours_s:.0f} s, reference {ref_s:.0f} s)",
            flush=True,
        )
    ray.shutdown()

    final = {side: [h["val/segm_map"][-1] for h in runs] for side, runs in histories.items()}
    ours_mean, ref_mean = (statistics.mean(values) for values in final.values())
    title = f"{args.arch} on {args.data}, {args.epochs} epochs, {args.device}, seeds {args.seeds}"
    png = plot(histories, Path(args.out).resolve(), title)
    print(f"\n{title}")
    verdict = "OK" if abs(ours_mean - ref_mean) <= 0.02 else "OUTSIDE"
    print(
        f"  final segm mAP50-95: ours {ours_mean:.4f}, reference {ref_mean:.4f} (means over seeds); "
        f"difference {ours_mean - ref_mean:+.4f} (goal within +-0.02): {verdict}"
    )
    print(f"  curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
