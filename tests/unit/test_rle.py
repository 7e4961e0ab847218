"""instseg.data.rle: COCO's compressed counts decoded and encoded for many masks at once, exactly as pycocotools
and schema.decode_rle_string read and write them, and masks cropped to their box in run space exactly as
decoding, slicing and encoding them would."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instseg.data.rle import covered_pixels, crop_rles, decode_counts, encode_counts, to_rle
from instseg.data.schema import decode_rle_string
from instseg.data.validation import is_empty_rle


def _random_masks(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Masks of awkward shapes: empty, one pixel, full, touching every border, several blobs, full-height
    columns (runs that cross from one column into the next)."""
    masks = []
    for index in range(count):
        height, width = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        mask = np.zeros((height, width), dtype=np.uint8)
        kind = index % 6
        if kind == 1:
            mask[rng.integers(height), rng.integers(width)] = 1
        elif kind == 2:
            mask[:] = 1
        elif kind == 3:
            mask[:, rng.integers(width) :] = 1  # whole columns up to the last pixel
        elif kind == 4:
            mask = (rng.random((height, width)) < 0.3).astype(np.uint8)
        elif kind == 5:
            y0, x0 = rng.integers(height), rng.integers(width)
            mask[y0 : y0 + int(rng.integers(1, 10)), x0 : x0 + int(rng.integers(1, 10))] = 1
        masks.append(np.asfortranarray(mask))
    return masks


def test_crops_are_those_of_decoding_slicing_and_encoding():
    masks = _random_masks(np.random.default_rng(0), 600)
    rles = [mask_utils.encode(mask) for mask in masks]
    crops = crop_rles(rles)
    for index, (mask, rle) in enumerate(zip(masks, rles)):
        x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(rle))
        expected = mask_utils.encode(np.asfortranarray(mask[y : y + max(h, 1), x : x + max(w, 1)]))
        assert crops.rle(index) == {"size": list(expected["size"]), "counts": expected["counts"]}, index
        assert (int(crops.x0[index]), int(crops.y0[index])) == (x, y)


def test_polygon_crops_match_the_full_image_rasterisation():
    rng = random.Random(1)
    polygons = []
    for _ in range(200):
        cx, cy, r = rng.uniform(0, 200), rng.uniform(0, 100), rng.uniform(1, 60)
        poly = []
        for _ in range(6):
            poly += [
                min(199.9, max(0.0, cx + r * rng.uniform(-1, 1))),
                min(99.9, max(0.0, cy + r * rng.uniform(-1, 1))),
            ]
        polygons.append(poly)
    rles = [to_rle([poly], 100, 200) for poly in polygons]
    crops = crop_rles(rles)
    for index, rle in enumerate(rles):
        full = mask_utils.decode(rle)
        x, y = int(crops.x0[index]), int(crops.y0[index])
        cropped = mask_utils.decode(crops.rle(index))
        h, w = cropped.shape
        pasted = np.zeros_like(full)
        pasted[y : y + h, x : x + w] = cropped
        assert np.array_equal(pasted, full), index


def test_the_codec_reads_and_writes_what_pycocotools_and_the_python_decoder_do():
    masks = _random_masks(np.random.default_rng(2), 300)
    strings = [mask_utils.encode(mask)["counts"] for mask in masks]
    runs, lengths, ok = decode_counts(strings)
    assert ok.all()
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    for index, text in enumerate(strings):
        assert runs[offsets[index] : offsets[index + 1]].tolist() == decode_rle_string(text.decode())
    assert encode_counts(runs, lengths) == strings


def test_malformed_strings_are_flagged_and_well_formed_ones_read_exactly():
    rng = random.Random(3)
    strings = ["", "0", "garbage!!", "PPYo0", "`", "o", "n0", "``````0", "```````0", "é0"]
    strings += ["".join(chr(48 + rng.randrange(0, 70)) for _ in range(rng.randrange(0, 12))) for _ in range(2000)]
    runs, lengths, ok = decode_counts(strings)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    for index, text in enumerate(strings):
        expected = decode_rle_string(text)
        if ok[index]:
            assert runs[offsets[index] : offsets[index + 1]].tolist() == expected, text
        else:
            assert lengths[index] == 0
            # what the Python decoder reads is only a string of a value beyond 7 groups, never written by pycocotools
            assert expected is None or max(len(group) for group in _groups(text)) > 7, text
    totals, sound = covered_pixels(strings)
    assert not sound[2] and not sound[4] and sound[0] and totals[0] == 0


def _groups(text: str) -> list[str]:
    groups, current = [], ""
    for character in text:
        current += character
        if ord(character) - 48 < 32:
            groups.append(current)
            current = ""
    return groups


@pytest.mark.parametrize("seed", range(3))
def test_an_empty_polygon_mask_is_one_run(seed):
    """validation's zero-area check reads the run count of the counts string, not the decoded area."""
    rng = random.Random(seed)
    for _ in range(300):
        x, y = rng.uniform(0, 50), rng.uniform(0, 50)
        size = rng.choice([0.01, 0.2, 0.6, 3.0])
        poly = [x, y, x + size, y, x + size * rng.random(), y + size * rng.random()]
        rle = to_rle([poly], 60, 60)
        assert is_empty_rle(rle) == (mask_utils.area(rle) == 0)
