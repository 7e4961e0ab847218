"""Run-length encoded instance masks: COCO segmentations to RLE, COCO's compressed counts strings decoded and
encoded for many masks at once (numpy, no Python loop per run), and masks cropped to their pixel box.

A training sample decodes each instance from an RLE of its mask cropped to its box (a few hundred bytes that
decode in a fraction of the full-image time) and pastes it into zeroed masks. The crop is cut from the
full-image rasterisation, so its pixels are exactly pycocotools' (rasterising a shifted polygon in the crop
alone moves some boundary pixels), but in run space: no full-image mask is decoded (that cost 1 ms an
instance, 15 minutes at COCO size).

COCO RLE is column-major over the image's [height, width] pixels, alternating background and foreground runs,
starting with background. The compressed string (pycocotools' rleToString) writes each run, less the run two
before it from the fourth run on, in 5-bit groups, least significant first, as characters from '0' (48): bit
0x20 says another group follows, bit 0x10 of a value's last group is its sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

MAX_GROUPS = 7  # 5-bit groups of one value: 35 bits, beyond any image's pixel count


def polygons_rle(polygons: list[list[float]], height: int, width: int) -> dict[str, Any]:
    """One compressed RLE of the union of `polygons` (pycocotools; merging a single polygon's RLE with nothing
    gives back the same runs, so that step is skipped for it)."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    return rles[0] if len(rles) == 1 else mask_utils.merge(rles)


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Polygons, uncompressed or compressed RLE -> one compressed RLE (pycocotools)."""
    if isinstance(segmentation, list):
        return polygons_rle(segmentation, height, width)
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation.get("counts"), str):
        return {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
    return segmentation


def starts_of(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive blocks of `lengths` items begins."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _cumsum_by_block(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Cumulative sums of `values` that restart wherever `owner` changes (each owner one contiguous block)."""
    if not len(values):
        return values.copy()
    through = np.cumsum(values)
    starts = np.concatenate(([True], owner[1:] != owner[:-1]))
    first = np.flatnonzero(starts)
    base = np.concatenate(([0], through[first[1:] - 1]))
    return through - base[np.cumsum(starts) - 1]


BLOCK_CHARS = 1 << 20  # characters decoded at a time: the block's arrays stay in the CPU's caches


def decode_counts(strings: Sequence[bytes | str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(runs int64, number of runs of each string, well formed) for compressed COCO counts strings. Well formed:
    every character a 6-bit group ('0' to 'o'), the string does not stop inside a value, and no value takes
    more than MAX_GROUPS groups (pycocotools never writes one; schema.decode_rle_string reads such a string
    exactly). A malformed string gets no runs."""
    encoded = [s.encode("latin-1") if isinstance(s, str) and s.isascii() else s if isinstance(s, bytes) else b"\xff"
               for s in strings]  # fmt: skip
    sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    parts, lengths, oks = [], [], []
    first = 0
    while first < len(encoded) or not parts:
        last = first + max(1, int(np.searchsorted(np.cumsum(sizes[first:]), BLOCK_CHARS)))
        runs, counts, ok = _decode_block(
            np.frombuffer(b"".join(encoded[first:last]), dtype=np.uint8), sizes[first:last]
        )
        parts.append(runs)
        lengths.append(counts)
        oks.append(ok)
        first = last
        if first >= len(encoded):
            break
    return np.concatenate(parts), np.concatenate(lengths), np.concatenate(oks)


def _decode_block(chars: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = len(sizes)
    ok = np.ones(count, dtype=bool)
    if not count:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), ok
    starts = starts_of(sizes)
    nonempty = sizes > 0
    bad = np.flatnonzero((chars < 48) | (chars > 111))
    if len(bad):
        ok[np.searchsorted(starts, bad, side="right") - 1] = False
    ok[nonempty] &= chars[(starts + sizes - 1)[nonempty]] < 80  # a string's last group ends its last value
    if not ok.all():  # without malformed strings no value runs from one string into the next
        chars = chars[np.repeat(ok, sizes)]
        sizes = np.where(ok, sizes, 0)
        starts = starts_of(sizes)
    groups = chars.astype(np.int64) - 48
    last = np.flatnonzero(groups < 32)  # each value's last group (no continuation bit)
    first = np.empty_like(last)
    first[:1] = 0
    first[1:] = last[:-1] + 1
    span = last - first + 1  # groups of each value
    # per string: its values are those whose last group lies inside it
    per_string = np.diff(np.searchsorted(last, np.append(starts, len(groups))))
    value_owner = np.repeat(np.arange(count), per_string)
    long = span > MAX_GROUPS
    if long.any():
        ok[value_owner[long]] = False
    payload = groups & 0x1F
    values = payload[first]
    for level in range(1, MAX_GROUPS):
        more = np.flatnonzero(span > level)
        if not len(more):
            break
        values[more] += payload[first[more] + level] << (5 * level)
    sign = (groups[last] >> 4) & 1  # the sign bit of each value's last group
    values -= sign << (5 * np.minimum(span, MAX_GROUPS))
    value_start = starts_of(per_string)
    position = np.arange(len(values)) - value_start[value_owner]
    runs = _undelta(values, position, value_start, value_owner)
    if long.any():
        runs = runs[ok[value_owner]]
    return runs, np.where(ok, per_string, 0), ok


def _undelta(values: np.ndarray, position: np.ndarray, value_start: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Runs from compressed values: run i is value i plus run i - 2 from the fourth run on, i.e. for i >= 1 the sum
    of the values at positions 1..i of i's parity. Two strided cumulative sums over the whole block (every other
    element), less each string's base of that parity: no boolean masks, which are slow at this size."""
    heads = position == 0
    chained = np.where(heads, 0, values)
    stepped = np.empty_like(chained)
    stepped[0::2] = np.cumsum(chained[0::2])
    stepped[1::2] = np.cumsum(chained[1::2])
    # before string k: the strided sum at its start (its own head contributes 0) and at the index before it
    same = stepped[np.minimum(value_start, len(values) - 1)] if len(values) else value_start
    other = np.where(value_start > 0, stepped[np.maximum(value_start - 1, 0)], 0) if len(values) else value_start
    base = np.where(position % 2 == 0, same[owner], other[owner])
    runs = stepped - base
    runs[heads] = values[heads]
    return runs


def encode_counts(runs: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """pycocotools' compressed counts string of each block of `runs` (`lengths` runs each)."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    values = runs.astype(np.int64)
    later = np.flatnonzero(np.arange(len(runs)) - starts_of(lengths)[owner] > 2)
    values[later] -= runs[later - 2]
    # groups a value needs: its two's-complement bit length (sign included), 5 bits a group
    magnitude = np.where(values >= 0, values, ~values).astype(np.float64)  # exact: far below 2**53
    groups = np.maximum(1, (np.frexp(magnitude)[1] + 5) // 5)
    at = starts_of(groups)  # each value's first character in the output
    out = np.empty(int(groups.sum()), dtype=np.uint8)
    chosen, shifted = np.arange(len(values)), values
    for level in range(MAX_GROUPS):  # every value's first group, then the second group of those that have one, ...
        out[at[chosen] + level] = 48 + ((shifted & 0x1F) | np.where(groups[chosen] > level + 1, 0x20, 0))
        more = groups[chosen] > level + 1
        if not more.any():
            break
        chosen, shifted = chosen[more], shifted[more] >> 5
    blob = out.tobytes()
    per_string = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, weights=groups, minlength=len(lengths)).astype(np.int64), out=per_string[1:])
    return [blob[per_string[i] : per_string[i + 1]] for i in range(len(lengths))]


@dataclass
class Crops:
    """Masks cropped to their pixel boxes: compressed counts of each crop, and where it sits in its image."""

    counts: list[bytes]
    x0: np.ndarray  # int64 [n]
    y0: np.ndarray
    height: np.ndarray
    width: np.ndarray

    def rle(self, index: int) -> dict[str, Any]:
        return {"size": [int(self.height[index]), int(self.width[index])], "counts": self.counts[index]}


def crop_rles(rles: Sequence[dict[str, Any]]) -> Crops:
    """Each compressed full-image RLE cropped to its pixel box: the same as pycocotools encoding
    decode(rle)[y0:y0+h, x0:x0+w] (an empty mask: 1x1 at its box's corner). Every foreground run keeps its
    length in the crop, where it starts at (column - x0) * crop height + (row - y0); runs that meet there join."""
    if not rles:
        empty = np.zeros(0, dtype=np.int64)
        return Crops([], empty, empty, empty, empty)
    boxes = np.rint(mask_utils.toBbox(list(rles))).astype(np.int64).reshape(-1, 4)
    runs, lengths, ok = decode_counts([rle["counts"] for rle in rles])
    if not ok.all():
        raise ValueError(f"malformed RLE counts (mask {int(np.flatnonzero(~ok)[0])} of the batch)")
    owner = np.repeat(np.arange(len(rles)), lengths)
    position = np.arange(len(runs)) - starts_of(lengths)[owner]
    ends = _cumsum_by_block(runs, owner)
    foreground = (position % 2 == 1) & (runs > 0)
    heights = np.array([int(rle["size"][0]) for rle in rles], dtype=np.int64)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    crop_w, crop_h = np.maximum(boxes[:, 2], 1), np.maximum(boxes[:, 3], 1)
    who = owner[foreground]
    column, row = np.divmod(ends[foreground] - runs[foreground], heights[who])
    first = (column - x0[who]) * crop_h[who] + (row - y0[who])
    last = first + runs[foreground]  # one past the run's last pixel in the crop
    joined = np.flatnonzero((first[1:] == last[:-1]) & (who[1:] == who[:-1]))
    keep_first, keep_last = np.ones(len(first), dtype=bool), np.ones(len(last), dtype=bool)
    keep_first[joined + 1], keep_last[joined] = False, False
    first, last, who = first[keep_first], last[keep_last], who[keep_first]
    # each crop's run boundaries: 0, its edges, its pixel count; its runs are their differences
    per_mask = np.bincount(who, minlength=len(rles))
    block = 2 * per_mask + 2
    block_start = starts_of(block)
    bounds = np.empty(int(block.sum()), dtype=np.int64)
    bounds[block_start] = 0
    bounds[block_start + block - 1] = crop_h * crop_w
    edge_index = np.arange(len(first)) - starts_of(per_mask)[who]
    bounds[block_start[who] + 1 + 2 * edge_index] = first
    bounds[block_start[who] + 2 + 2 * edge_index] = last
    within = np.ones(len(bounds) - 1, dtype=bool)
    within[block_start[1:] - 1] = False  # the step from one crop's last boundary to the next crop's 0
    crop_runs = np.diff(bounds)[within]
    run_lengths = block - 1
    # a mask that reaches its crop's last pixel ends on foreground: no empty background run after it
    tail = starts_of(run_lengths) + run_lengths - 1
    drop = (crop_runs[tail] == 0) & (run_lengths > 1)
    keep = np.ones(len(crop_runs), dtype=bool)
    keep[tail[drop]] = False
    return Crops(encode_counts(crop_runs[keep], run_lengths - drop), x0, y0, crop_h, crop_w)


def covered_pixels(strings: Sequence[bytes | str]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels the runs of each compressed counts string cover, well formed with no negative run) for many strings
    at once: an RLE is sound when it is well formed and covers exactly height x width pixels."""
    runs, lengths, ok = decode_counts(strings)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    negative = np.bincount(owner[runs < 0], minlength=len(lengths)) > 0
    totals = np.zeros(len(lengths), dtype=np.int64)
    np.add.at(totals, owner, runs)
    return totals, ok & ~negative
