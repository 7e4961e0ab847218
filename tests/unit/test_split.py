"""`instseg data split`: seeded, class-stratified train/val splits of one-split data, written beside the source."""

import json
import random
import shutil
from collections import defaultdict

import pytest

from instseg.cli import main as cli_main
from instseg.config import DataConfig
from instseg.data.formats import annotation_path, convert
from instseg.data.loaders import build_datasets
from instseg.data.split import stratified_val_ids
from instseg.errors import DataError
from tests.helpers import shared_dataset


@pytest.fixture(scope="module")
def coco128(tmp_path_factory):
    """COCO128-seg converted: one split, train2017 (128 images, 71 classes)."""
    root = tmp_path_factory.mktemp("coco128") / "coco128-seg"
    convert(shared_dataset("coco128-seg"), root, names="coco80")
    return root


def _coco(root, split):
    return json.loads(annotation_path(root, split).read_text())


def _class_share_error(coco, val_ids, fraction):
    """Mean over classes on 2+ images of |share of the class's images in val - fraction|, and how many of those
    classes train lacks."""
    images_of = defaultdict(set)
    for ann in coco["annotations"]:
        images_of[ann["category_id"]].add(ann["image_id"])
    classes = [c for c, ids in images_of.items() if len(ids) >= 2]
    error = sum(abs(len(images_of[c] & val_ids) / len(images_of[c]) - fraction) for c in classes) / len(classes)
    return error, sum(images_of[c] <= val_ids for c in classes)


def test_coco128_split_is_seeded_stratified_and_trainable(coco128, tmp_path, capsys):
    root = tmp_path / "ds"
    shutil.copytree(coco128, root)
    with pytest.raises(DataError, match="split 'train' not found.*instseg data split"):
        build_datasets(DataConfig(root=str(root)))
    assert cli_main(["data", "check", str(root)]) == 0
    assert "warning: no split 'val' (data.val_split)" in capsys.readouterr().out

    assert cli_main(["data", "split", str(root), "--val", "0.2", "--seed", "0"]) == 0
    train, val, source = _coco(root, "train"), _coco(root, "val"), _coco(root, "train2017")
    assert abs(len(val["images"]) - 0.2 * 128) <= 2 and len(train["images"]) + len(val["images"]) == 128
    assert {i["id"] for i in train["images"]}.isdisjoint({i["id"] for i in val["images"]})
    assert len(train["annotations"]) + len(val["annotations"]) == len(source["annotations"])
    assert all((root / "images" / "val" / i["file_name"]).is_file() for i in val["images"])
    assert (root / "images" / "train2017").is_dir() and len(source["images"]) == 128, (
        "the source split is left as it was"
    )
    train_set, val_set = build_datasets(DataConfig(root=str(root)))  # what training opens
    assert (len(train_set), len(val_set)) == (len(train["images"]), len(val["images"])) and val_set[0][1][
        "masks"
    ].shape[0] > 0

    # the same seed gives the same split, another seed another one
    again = tmp_path / "again"
    shutil.copytree(coco128, again)
    assert cli_main(["data", "split", str(again), "--seed", "0"]) == 0
    assert _coco(again, "val") == val
    ids = {i["id"] for i in val["images"]}
    assert stratified_val_ids(source, 0.2, seed=1) != ids

    # stratified: every class on 2+ images keeps some in train, and val's class shares beat random splits
    error, train_lacks = _class_share_error(source, ids, 0.2)
    assert train_lacks == 0
    image_ids = sorted(i["id"] for i in source["images"])
    random_errors = [
        _class_share_error(source, set(random.Random(s).sample(image_ids, len(ids))), 0.2)[0] for s in range(20)
    ]
    assert error < min(random_errors), (error, sorted(random_errors)[:3])


def test_split_refuses_to_overwrite_and_names_what_is_wrong(coco128, tmp_path, capsys):
    root = tmp_path / "ds"
    shutil.copytree(coco128, root)
    assert cli_main(["data", "split", str(root)]) == 0
    capsys.readouterr()
    before = annotation_path(root, "val").read_bytes()
    assert cli_main(["data", "split", str(root), "--source", "train2017", "--seed", "3"]) == 2
    assert "already has split(s) train, val: pass --overwrite" in capsys.readouterr().err
    assert annotation_path(root, "val").read_bytes() == before
    assert cli_main(["data", "split", str(root)]) == 2
    assert "several splits (train, train2017, val): name the one to split with --source" in capsys.readouterr().err
    assert cli_main(["data", "split", str(root), "--source", "train2017", "--seed", "3", "--overwrite"]) == 0
    assert annotation_path(root, "val").read_bytes() != before
    assert cli_main(["data", "split", str(root), "--source", "train", "--train-split", "train"]) == 2
    assert "must be three names" in capsys.readouterr().err
    assert cli_main(["data", "split", str(root), "--source", "train2017", "--val", "1.5"]) == 2
    assert not list(root.rglob(".*")), "no temp files left behind"


def test_group_by_folder_keeps_a_folder_on_one_side():
    images = [{"id": i, "file_name": f"video{i // 5}/frame{i % 5}.jpg"} for i in range(40)]
    annotations = [{"id": i, "image_id": i, "category_id": 1 + i % 3} for i in range(40)]
    val = stratified_val_ids({"images": images, "annotations": annotations}, 0.25, seed=0, group_by_folder=True)
    folders = {image["file_name"].split("/")[0]: image["id"] in val for image in images}
    assert all((image["id"] in val) == folders[image["file_name"].split("/")[0]] for image in images)
    assert sum(folders.values()) == 2  # 2 of 8 folders
    flat = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}], "annotations": []}
    with pytest.raises(DataError, match="every image is in one folder"):
        stratified_val_ids(flat, 0.5, seed=0, group_by_folder=True)


def test_split_of_a_file_that_is_not_coco_is_one_line(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_all.json").write_text('{"images": 3}')
    assert cli_main(["data", "split", str(tmp_path)]) == 2
    assert "not a COCO instances file" in capsys.readouterr().err
    assert cli_main(["data", "split", str(tmp_path / "nowhere")]) == 2
    assert "no annotations/instances_*.json" in capsys.readouterr().err


def _recounting_split(coco, val_fraction, seed, group_by_folder=False):
    """The split as first written: the remaining images of every class recounted each round (quadratic in the
    images at COCO size); the counted-as-they-go version must give exactly the same val ids."""
    from collections import Counter
    from pathlib import Path

    groups = defaultdict(list)
    for image in sorted(coco["images"], key=lambda i: i["id"]):
        groups[str(Path(image["file_name"]).parent) if group_by_folder else str(image["id"])].append(image["id"])
    classes_of_image = defaultdict(set)
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            classes_of_image[ann["image_id"]].add(ann["category_id"])
    classes = {key: set().union(*(classes_of_image[i] for i in ids)) for key, ids in groups.items()}
    rng = random.Random(seed)
    order = list(groups)
    rng.shuffle(order)
    shares = {"val": val_fraction, "train": 1 - val_fraction}
    per_class = Counter(c for key in order for c in classes[key])
    wanted = {side: {c: share * n for c, n in per_class.items()} for side, share in shares.items()}
    wanted_images = {side: share * len(coco["images"]) for side, share in shares.items()}
    side_of = {}

    def assign(key, side):
        side_of[key] = side
        wanted_images[side] -= len(groups[key])
        for c in classes[key]:
            wanted[side][c] -= 1

    unassigned = [key for key in order if classes[key]]
    while unassigned:
        remaining = Counter(c for key in unassigned for c in classes[key])
        rarest = min(remaining, key=lambda c: (remaining[c], c))
        for key in [key for key in unassigned if rarest in classes[key]]:
            assign(key, max(shares, key=lambda side: (wanted[side][rarest], wanted_images[side], rng.random())))
        unassigned = [key for key in unassigned if key not in side_of]
    for key in order:
        if key not in side_of:
            assign(key, max(shares, key=lambda side: (wanted_images[side], rng.random())))
    return {image_id for key, side in side_of.items() if side == "val" for image_id in groups[key]}


def test_the_split_is_the_one_the_recounting_algorithm_makes(coco128):
    source = _coco(coco128, "train2017")
    rng = random.Random(7)
    folders = {"images": [{"id": i, "file_name": f"f{i % 37}/{i}.jpg"} for i in range(300)], "annotations": []}
    folders["annotations"] = [
        {"id": k, "image_id": rng.randrange(300), "category_id": rng.randrange(1, 30), "iscrowd": int(k % 50 == 0)}
        for k in range(1500)
    ]
    for coco, grouped in ((source, False), (folders, False), (folders, True)):
        for seed in range(2):
            for fraction in (0.05, 0.3):
                assert stratified_val_ids(coco, fraction, seed, grouped) == _recounting_split(
                    coco, fraction, seed, grouped
                )
