import json
import shutil

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instseg.cli import main as cli_main
from instseg.data.coco import CocoInstanceDataset
from instseg.data.files import MADE_BY_KEY
from instseg.data.formats import COCO80, convert, detect_format
from tests.helpers import shared_dataset


def _load(root, split):
    """An annotation file without the mark of the command that wrote it."""
    coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    coco.get("info", {}).pop(MADE_BY_KEY, None)
    return coco


def test_coco8_seg_converts_to_8_images_30_instances_12_classes(tmp_path):
    src = shared_dataset("coco8-seg")
    assert detect_format(src) == "yolo"
    counts = convert(src, tmp_path / "coco8")
    assert sum(c["images"] for c in counts.values()) == 8
    assert sum(c["instances"] for c in counts.values()) == 30
    splits = [_load(tmp_path / "coco8", s) for s in ("train", "val")]
    assert len({a["category_id"] for coco in splits for a in coco["annotations"]}) == 12
    assert [c["name"] for c in splits[0]["categories"]] == list(COCO80)
    dataset = CocoInstanceDataset(tmp_path / "coco8", "val")
    image, target = dataset[0]
    assert target["masks"].shape[1:] == image.shape[1:] and len(target["labels"]) > 0


def test_yolo_polygons_round_trip_without_loss(tmp_path):
    src = shared_dataset("coco8-seg")
    convert(src, tmp_path / "coco8")
    coco = _load(tmp_path / "coco8", "train")
    images = {i["id"]: i for i in coco["images"]}
    by_file: dict[str, list] = {}
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        (poly,) = ann["segmentation"]
        normalised = [v / (image["width"] if i % 2 == 0 else image["height"]) for i, v in enumerate(poly)]
        by_file.setdefault(image["file_name"], []).append([ann["category_id"] - 1, *normalised])
    for file_name, rows in by_file.items():
        original = [
            [float(v) for v in line.split()]
            for line in (src / "labels" / "train" / file_name.replace(".jpg", ".txt")).read_text().splitlines()
        ]
        assert len(rows) == len(original)
        for got, want in zip(rows, original):
            assert got == pytest.approx(want, abs=1e-12)


def test_coco128_seg_converts_every_image(tmp_path):
    counts = convert(shared_dataset("coco128-seg"), tmp_path / "c128")
    assert counts == {
        "train2017": {"images": 128, "instances": 929, "classes": 71}
    }  # 12 more polygons sit in 2 orphan label files


def test_roboflow_export_is_detected_and_converted(tmp_path, synth_root):
    export = tmp_path / "export"
    for split, folder in (("train", "train"), ("val", "valid")):
        shutil.copytree(synth_root / "images" / split, export / folder)
        shutil.copy(synth_root / "annotations" / f"instances_{split}.json", export / folder / "_annotations.coco.json")
    assert detect_format(export) == "roboflow"
    assert cli_main(["data", "convert", str(export), str(tmp_path / "out")]) == 0
    assert _load(tmp_path / "out", "val") == _load(synth_root, "val")
    assert len(CocoInstanceDataset(tmp_path / "out", "train")) == len(CocoInstanceDataset(synth_root, "train"))


def test_rle_segmentations_decode_like_their_polygons(tmp_path, synth_root):
    root = tmp_path / "rle"
    shutil.copytree(synth_root, root)
    coco = _load(root, "train")
    image = coco["images"][0]
    h, w = image["height"], image["width"]
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    expected = CocoInstanceDataset(synth_root, "train")[0][1]["masks"]
    compressed = mask_utils.merge(mask_utils.frPyObjects(anns[0]["segmentation"], h, w))
    anns[0]["segmentation"] = {"size": [h, w], "counts": compressed["counts"].decode()}
    if len(anns) > 1:  # uncompressed RLE: column-major run lengths
        binary = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(anns[1]["segmentation"], h, w)))
        flat = binary.flatten(order="F")
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        anns[1]["segmentation"] = {"size": [h, w], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    assert np.array_equal(CocoInstanceDataset(root, "train")[0][1]["masks"].numpy(), expected.numpy())


def test_crowd_annotations_are_not_training_targets(tmp_path, synth_root):
    root = tmp_path / "crowd"
    shutil.copytree(synth_root, root)
    coco = _load(root, "train")
    first = coco["annotations"][0]
    first["iscrowd"] = 1
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    n_before = len(CocoInstanceDataset(synth_root, "train")[0][1]["labels"])
    assert len(CocoInstanceDataset(root, "train")[0][1]["labels"]) == n_before - 1
