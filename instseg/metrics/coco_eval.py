"""COCO bbox + segm evaluation in detectron2's reset / process / compute shape, scored by pycocotools or by
faster-coco-eval (a C++ drop-in for COCOeval: the same 12 stats, several times faster; see bench/eval.py).

Turning a model's masks into RLE is the slow part of collecting predictions, so CocoEvaluator.process
thresholds on the model's device and hands the encoding to a worker thread: the next batch runs meanwhile.
Masks on a GPU are run-length encoded there (device_rle): only the run boundaries cross to the host, not
every pixel, and pycocotools' string compression of the counts is all that runs on the CPU.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instseg.data.ground_truth import LabelMap
from instseg.metrics.coco_scoring import DEFAULT_BACKEND, IOU_TYPES, Backend, coco_stats, results_for
from instseg.metrics.names import COCO_STAT_NAMES, val_key

MASK_THRESHOLD = 0.5
ENCODE_THREADS = 2
MAX_QUEUED_IMAGES = 16  # images whose masks wait for encoding (on the GPU: up to ~64 MB each at 800 px)


def binary_masks(output: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The output's masks thresholded, on its device, as [N, W, H] bool: pycocotools wants [H, W, N] in
    column-major order, which is [N, W, H] in row-major order."""
    if "masks" not in output:
        return None
    return (output["masks"].detach()[:, 0] > MASK_THRESHOLD).transpose(1, 2).contiguous()


def device_rle(binary: torch.Tensor) -> list[dict[str, Any]]:
    """pycocotools' compressed RLE of [N, W, H] binary masks (each mask's rows in COCO's column-major
    order), with the runs found on the masks' device: the same dicts as mask_utils.encode."""
    count, width, height = binary.shape
    flat = binary.reshape(count, width * height)
    rows, changes = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    rows, changes, starts_with_one = rows.cpu().numpy(), changes.cpu().numpy(), flat[:, 0].cpu().numpy()
    bounds = np.searchsorted(rows, np.arange(count + 1))
    encoded = []
    for index in range(count):
        edges = np.concatenate(([0], changes[bounds[index] : bounds[index + 1]] + 1, [width * height]))
        runs = np.diff(edges)  # COCO's runs alternate 0s and 1s, starting with 0s
        if starts_with_one[index]:
            runs = np.concatenate(([0], runs))
        encoded.append(mask_utils.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width))
    return encoded


def to_coco_results(
    image_id: int, output: dict[str, torch.Tensor], label_map: LabelMap, binary: torch.Tensor | None = None
) -> list[dict[str, Any]]:
    """One image's model output -> COCO results entries (xywh boxes, compressed-RLE masks). `binary` is the
    output's binary_masks when they were made already (then output's float masks are not needed)."""
    boxes = output["boxes"].detach().float().cpu().numpy()  # float: numpy has no bf16 (a bf16 forward's scores)
    scores = output["scores"].detach().float().cpu().numpy()
    labels = output["labels"].detach().cpu().numpy()
    masks = None
    if binary is None:
        binary = binary_masks(output)
    if binary is not None:
        if not len(binary):
            masks = []
        elif binary.is_cuda:
            masks = device_rle(binary)
        else:  # a zero-copy numpy view of [N, W, H] that is already Fortran-ordered [H, W, N]
            masks = mask_utils.encode(binary.view(torch.uint8).numpy().transpose(2, 1, 0))
    results = []
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        entry: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": label_map.category_id(int(labels[i])),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[i]),
        }
        if masks is not None:
            rle = masks[i]
            entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.append(entry)
    return results


class CocoEvaluator:
    """Collects predictions image by image, then computes `val/{bbox,segm}_{stat}` metrics."""

    def __init__(
        self,
        coco_gt: COCO | Callable[[], COCO],
        label_map: LabelMap,
        iou_types: tuple[str, ...] = IOU_TYPES,
        backend: Backend = DEFAULT_BACKEND,
    ) -> None:
        # a callable is asked for the ground truth only by compute(): in training only rank 0 ever reads it
        self._coco_gt = coco_gt
        self.label_map = label_map
        self.iou_types = iou_types
        self.backend = backend
        self._encoder: ThreadPoolExecutor | None = None
        self.reset()

    @property
    def coco_gt(self) -> COCO:
        if callable(self._coco_gt):
            self._coco_gt = self._coco_gt()
        return self._coco_gt

    def reset(self) -> None:
        self._results: list[dict[str, Any]] = []
        self._pending: deque[Future] = deque()
        self.image_ids: set[int] = set()

    def process(self, targets: list[dict[str, Any]], outputs: list[dict[str, torch.Tensor]]) -> None:
        """Queue one batch: masks are thresholded here, on the model's device, and copied to the host and
        RLE-encoded by a worker thread, in order."""
        if self._encoder is None:
            self._encoder = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="instseg-rle")
        for target, output in zip(targets, outputs):
            image_id = int(target["image_id"])
            self.image_ids.add(image_id)
            binary = binary_masks(output)
            rest = {key: value for key, value in output.items() if key != "masks"}  # float masks: freed now
            self._pending.append(self._encoder.submit(to_coco_results, image_id, rest, self.label_map, binary))
        while len(self._pending) > MAX_QUEUED_IMAGES:  # bounded memory when encoding falls behind
            self._results.extend(self._pending.popleft().result())

    @property
    def results(self) -> list[dict[str, Any]]:
        """Every result so far, in the order processed (waits for the encoding still under way)."""
        while self._pending:
            self._results.extend(self._pending.popleft().result())
        return self._results

    def merge(self, parts: list[tuple[list[dict[str, Any]], set[int]]]) -> None:
        """Take the (results, image ids) of every rank, e.g. from torch.distributed.all_gather_object."""
        self.reset()
        for results, image_ids in parts:
            self._results.extend(results)
            self.image_ids |= set(image_ids)

    def state(self) -> tuple[list[dict[str, Any]], set[int]]:
        return self.results, self.image_ids

    def compute(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        results = self.results
        for iou_type in self.iou_types:
            stats = coco_stats(self.coco_gt, results_for(results, iou_type), iou_type, self.image_ids, self.backend)
            metrics.update({val_key(iou_type, name): value for name, value in zip(COCO_STAT_NAMES, stats)})
        return metrics
