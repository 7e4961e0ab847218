"""Data pipeline benchmark: instseg's dataset + collate against the torchvision detection references'
approach, measured side by side in one run on COCO128-seg (converted to COCO json first).

Reference (as in torchvision references/detection/coco_utils.py): torchvision.datasets.CocoDetection
decodes with PIL, every sample rasterises every polygon to a full-resolution mask (frPyObjects +
decode + any over parts), PILToTensor + float conversion, random horizontal flip.
instseg: torchvision.io decoding, polygons kept as compact RLE (rasterised once per annotation),
uint8 images scaled on the device, flip on tensors.

    .venv/bin/python bench/data_pipeline.py [--shared ../shared] [--rounds 5]

Prints images/s of each, the ratio, bytes per sample handed to the model, and checks that both give
the same boxes, labels and masks for every sample under a forced flip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from torchvision.datasets import CocoDetection
from torchvision.transforms.v2 import functional as F

from instseg.data.coco import CocoInstanceDataset
from instseg.data.formats import convert
from instseg.data.loaders import collate


class ReferenceDataset(torch.utils.data.Dataset):
    """The references' approach: PIL image + full-resolution polygon masks built per sample."""

    def __init__(self, image_dir: Path, annotation_file: Path, flip_prob: float) -> None:
        self.inner = CocoDetection(str(image_dir), str(annotation_file))
        self.flip_prob = flip_prob

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        image, anns = self.inner[index]
        width, height = image.size
        anns = [a for a in anns if a.get("iscrowd", 0) == 0]
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        masks = []
        for ann in anns:
            decoded = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], height, width))
            if decoded.ndim < 3:
                decoded = decoded[..., None]
            masks.append(torch.as_tensor(decoded, dtype=torch.uint8).any(dim=2))
        masks = torch.stack(masks).to(torch.uint8) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {
            "boxes": boxes[keep],
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
            "masks": masks[keep],
            "image_id": self.inner.ids[index],
        }
        tensor = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        if torch.rand(1).item() < self.flip_prob:
            tensor = tensor.flip(-1)
            flipped = target["boxes"].clone()
            flipped[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": flipped, "masks": target["masks"].flip(-1)}
        return tensor, target


def _epoch(dataset, batch_size: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)
    start = time.perf_counter()
    for _images, _targets in loader:
        pass
    return len(dataset) / (time.perf_counter() - start)


def _sample_bytes(sample) -> int:
    image, target = sample
    return image.numel() * image.element_size() + sum(
        v.numel() * v.element_size() for v in target.values() if torch.is_tensor(v)
    )


def check_identical(ours: CocoInstanceDataset, reference: ReferenceDataset) -> int:
    """Same pixels, boxes, labels (through the label map) and masks for every sample, both flipped."""
    for index in range(len(ours)):
        image, target = ours[index]
        ref_image, ref = reference[index]
        assert target["image_id"] == ref["image_id"]
        assert torch.equal(image, (ref_image * 255).round().to(torch.uint8)), (
            f"pixels differ on image {ref['image_id']}"
        )
        assert torch.allclose(target["boxes"], ref["boxes"]), f"boxes differ on image {ref['image_id']}"
        categories = [ours.label_map.category_id(int(label)) for label in target["labels"]]
        assert categories == ref["labels"].tolist(), f"labels differ on image {ref['image_id']}"
        assert torch.equal(target["masks"], ref["masks"]), f"masks differ on image {ref['image_id']}"
    return len(ours)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", default=str(Path(__file__).resolve().parents[2] / "shared"), help="the shared data folder"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    source = Path(args.shared) / "datasets" / "coco128-seg"
    if not source.is_dir():
        print(f"coco128-seg not found at {source}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # like a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco128"
        convert(source, root)
        split = "train2017"
        ann_file, image_dir = root / "annotations" / f"instances_{split}.json", root / "images" / split

        ours_flipped = CocoInstanceDataset(root, split, hflip_prob=1.0)
        checked = check_identical(ours_flipped, ReferenceDataset(image_dir, ann_file, flip_prob=1.0))
        print(f"identical pixels, boxes, labels and masks (flipped) on all {checked} samples")

        cold = CocoInstanceDataset(root, split, hflip_prob=0.5)
        reference = ReferenceDataset(image_dir, ann_file, flip_prob=0.5)
        cold_ours = _epoch(cold, args.batch_size)  # first epoch: RLEs are built as samples are read
        ours_rates, ref_rates = [], []
        for _ in range(args.rounds):
            ours_rates.append(_epoch(cold, args.batch_size))
            ref_rates.append(_epoch(reference, args.batch_size))
        ours_rate, ref_rate = statistics.median(ours_rates), statistics.median(ref_rates)
        ours_bytes = statistics.mean(_sample_bytes(cold[i]) for i in range(len(cold)))
        ref_bytes = statistics.mean(_sample_bytes(reference[i]) for i in range(len(reference)))

    print(f"{'pipeline':<28}{'images/s':>10}{'MB/sample':>12}")
    print(f"{'torchvision reference':<28}{ref_rate:>10.1f}{ref_bytes / 1e6:>12.2f}")
    print(f"{'instseg (first epoch)':<28}{cold_ours:>10.1f}{ours_bytes / 1e6:>12.2f}")
    print(f"{'instseg':<28}{ours_rate:>10.1f}{ours_bytes / 1e6:>12.2f}")
    print(
        f"ratio instseg / reference: {ours_rate / ref_rate:.2f}x (first epoch {cold_ours / ref_rate:.2f}x), "
        f"bytes per sample {ref_bytes / ours_bytes:.2f}x fewer"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
