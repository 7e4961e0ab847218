import json

import numpy as np
from pycocotools import mask as mask_utils

from instseg.cli import main as cli_main
from instseg.data.synth import CATEGORIES, synthesize


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    synthesize(tmp_path / "a", images=8, seed=3)
    synthesize(tmp_path / "b", images=8, seed=3)
    synthesize(tmp_path / "c", images=8, seed=4)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_dataset_has_classes_occlusion_and_masks_that_are_not_boxes(tmp_path):
    counts = synthesize(tmp_path / "d", images=40, seed=0)
    assert counts["train_images"] == 30 and counts["val_images"] == 10
    coco = json.loads((tmp_path / "d" / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CATEGORIES)
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3}
    images = {i["id"]: i for i in coco["images"]}
    areas = [a["area"] for a in coco["annotations"]]
    assert max(areas) > 8 * min(areas), "sizes should vary"
    occluded = [a for a in coco["annotations"] if len(a["segmentation"]) > 1]
    assert occluded, "some instances should be split by occluders into several polygons"
    fill_ratios = []
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
        box_area = ann["bbox"][2] * ann["bbox"][3]
        fill_ratios.append(mask_utils.area(rle) / box_area)
        assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
    assert np.median(fill_ratios) < 0.9, "masks should not just be their boxes"


def test_cli_synth_writes_layout(tmp_path, capsys):
    assert cli_main(["data", "synth", str(tmp_path / "s"), "--images", "4", "--seed", "1"]) == 0
    assert (tmp_path / "s" / "annotations" / "instances_val.json").is_file()
    assert len(list((tmp_path / "s" / "images" / "train").glob("*.jpg"))) == 3
    assert "wrote" in capsys.readouterr().out


def test_synthetic_data_records_how_it_was_made(tmp_path):
    from instseg.data.synth import synthesized_with

    synthesize(tmp_path / "s", images=8, seed=3)
    assert synthesized_with(tmp_path / "s") == {"images": 8, "seed": 3}
    assert synthesized_with(tmp_path / "missing") is None
    (tmp_path / "other" / "annotations").mkdir(parents=True)
    other = {"info": {"description": "COCO"}, "images": [], "annotations": []}
    (tmp_path / "other" / "annotations" / "instances_train.json").write_text(json.dumps(other))
    assert synthesized_with(tmp_path / "other") is None, "only our own synthetic data is ever regenerated"
