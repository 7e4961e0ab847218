"""`instseg data check` and the training policy, on broken datasets built here: one per problem kind."""

import json
import shutil
from pathlib import Path

import pytest

from instseg.cli import main as cli_main
from instseg.data.coco import CocoInstanceDataset
from instseg.errors import DataError
from tests.helpers import shared_dataset


def _coco(root: Path) -> dict:
    return json.loads((root / "annotations" / "instances_train.json").read_text())


def _save(root: Path, coco: dict) -> None:
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))


def _first_ann(coco):
    return coco["annotations"][0]


def _set_seg(seg):
    def mutate(root, coco):
        _first_ann(coco)["segmentation"] = seg

    return mutate


def _set_bbox(bbox):
    def mutate(root, coco):
        _first_ann(coco)["bbox"] = bbox

    return mutate


def _truncate(root, coco):
    path = root / "images" / "train" / coco["images"][0]["file_name"]
    path.write_bytes(path.read_bytes()[:400])


def _garbage(root, coco):
    (root / "images" / "train" / coco["images"][0]["file_name"]).write_bytes(b"not an image at all")


def _delete_image(root, coco):
    (root / "images" / "train" / coco["images"][0]["file_name"]).unlink()


def _resize_in_json(root, coco):
    coco["images"][0]["width"] += 7


def _unknown_image(root, coco):
    _first_ann(coco)["image_id"] = 99999


def _unknown_category(root, coco):
    _first_ann(coco)["category_id"] = 42


def _duplicate_image(root, coco):
    coco["images"].append(dict(coco["images"][1], id=coco["images"][0]["id"]))


def _duplicate_annotation(root, coco):
    coco["annotations"][1]["id"] = coco["annotations"][0]["id"]


COCO_CASES = {
    "image_missing": _delete_image,
    "image_unreadable": _garbage,
    "image_unreadable_truncated": _truncate,
    "image_size_mismatch": _resize_in_json,
    "unknown_image": _unknown_image,
    "unknown_category": _unknown_category,
    "duplicate_image_id": _duplicate_image,
    "duplicate_annotation_id": _duplicate_annotation,
    "polygon_too_few_points": _set_seg([[10, 10, 20, 20]]),
    "polygon_odd_coordinates": _set_seg([[10, 10, 20, 20, 30]]),
    "coordinate_not_finite": _set_seg([[10, 10, float("nan"), 20, 30, 40]]),
    "coordinate_negative": _set_seg([[-5, 10, 20, 20, 30, 40]]),
    "coordinate_outside_image": _set_seg([[10, 10, 500, 20, 30, 40]]),
    "zero_area_box": _set_bbox([10, 10, 0, 5]),
    "zero_area_mask": _set_seg([[10, 10, 20, 20, 30, 30]]),
    "empty_segmentation": _set_seg([]),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_each_coco_problem_is_named_with_its_location(case, tmp_path, synth_root, capsys):
    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    coco = _coco(root)
    COCO_CASES[case](root, coco)
    _save(root, coco)
    kind = case.replace("_truncated", "")
    assert cli_main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    problem_lines = [line for line in out.splitlines() if line.startswith("  ") and line.strip().startswith(kind)]
    assert problem_lines, out
    assert "instances_train.json" in problem_lines[0]
    if kind not in ("image_missing", "image_unreadable", "image_size_mismatch", "duplicate_image_id"):
        assert f"annotation id {coco['annotations'][0]['id']}" in problem_lines[0]
    else:
        assert "image id" in problem_lines[0]
    assert "1 problem(s)" in out or kind in ("duplicate_annotation_id",), out


def test_clean_dataset_exits_0_and_usage_errors_exit_2(synth_root, tmp_path, capsys):
    assert cli_main(["data", "check", str(synth_root)]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert cli_main(["data", "check", str(tmp_path / "nothing")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["data", "check", str(tmp_path / "empty")]) == 2
    assert cli_main(["data", "check"]) == 2
    assert "needs a dataset PATH (or --config with data.root)" in capsys.readouterr().err


def test_check_warns_when_the_configs_splits_are_missing(synth_root, tmp_path, capsys):
    from tests.helpers import DEMO_CONFIG

    config = tmp_path / "run.yaml"
    config.write_text(DEMO_CONFIG.read_text().replace("val_split: val ", "val_split: valid"))
    assert cli_main(["data", "check", str(synth_root), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"warning: no split 'valid' (data.val_split) in {synth_root} (it has: train, val)" in out
    assert f"instseg data split {synth_root} --val 0.2" in out and "data.train_split" not in out
    assert cli_main(["data", "check", str(synth_root)]) == 0
    assert "warning" not in capsys.readouterr().out


def _yolo(root: Path, lines: list[str]) -> Path:
    from PIL import Image

    for split in ("train",):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "images" / "train" / "a.jpg")
    Image.new("RGB", (64, 48)).save(root / "images" / "train" / "b.jpg")
    (root / "labels" / "train" / "a.txt").write_text("\n".join(lines) + "\n")
    (root / "labels" / "train" / "orphan.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    (root / "data.yaml").write_text("names: [thing, other]\n")
    return root


def test_yolo_problems_point_at_label_file_and_line(tmp_path, capsys):
    root = _yolo(
        tmp_path / "y",
        [
            "0 0.1 0.1 0.5 0.1 0.5 0.5",
            "1 0.1 0.1 0.5 0.1",
            "x 0.1 0.2",
            "5 0.1 0.1 0.5 0.1 0.5 0.5",
            "0 0.1 0.1 1.5 0.1 0.5 0.5",
        ],
    )
    assert cli_main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    label = root / "labels" / "train" / "a.txt"
    assert f"polygon_too_few_points     {label}:2" in out
    assert f"bad_label_line             {label}:3" in out
    assert f"unknown_category           {label}:4" in out
    assert f"coordinate_outside_image   {label}:5" in out
    assert f"label_without_image        {root / 'labels' / 'train' / 'orphan.txt'}" in out
    assert f"image_without_label        {root / 'images' / 'train' / 'b.jpg'}" in out
    assert "thing 2, other 1" in out  # names from data.yaml


def test_coco128_seg_reports_exactly_its_two_plus_two_mismatches(capsys):
    root = shared_dataset("coco128-seg")
    assert cli_main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    problems = [
        line.split()[0]
        for line in out.splitlines()
        if line.startswith("  ") and not line.startswith("   ") and not line.startswith("  split")
    ]
    assert sorted(problems) == ["image_without_label"] * 2 + ["label_without_image"] * 2, out
    assert (
        "000000000656.txt" in out
        and "000000000659.txt" in out
        and "000000000250.jpg" in out
        and "000000000508.jpg" in out
    )


def test_training_policy_errors_or_skips_with_counts(tmp_path, synth_root):
    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    coco = _coco(root)
    coco["annotations"][0]["segmentation"] = [[10, 10, 20, 20, 30, 30]]  # zero-area mask
    coco["annotations"][1]["bbox"] = [1, 1, 0, 0]
    _delete_image(root, coco)
    _save(root, coco)
    with pytest.raises(DataError, match="instseg data check") as err:
        CocoInstanceDataset(root, "train")
    assert "zero_area_mask" in str(err.value)
    dataset = CocoInstanceDataset(root, "train", on_invalid="skip")
    assert dict(dataset.skipped) == {"zero_area_mask": 1, "zero_area_box": 1, "image_missing": 1}
    assert len(dataset) == len(coco["images"]) - 1
    for index in range(len(dataset)):
        _, target = dataset[index]
        assert (target["masks"].flatten(1).sum(1) > 0).all()
        boxes = target["boxes"]
        assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and ((boxes[:, 3] - boxes[:, 1]) > 0).all()


def test_training_on_a_broken_dataset_stops_before_ray_in_one_line(tmp_path, synth_root):
    import subprocess
    import sys

    from tests.helpers import DEMO_CONFIG

    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    coco = _coco(root)
    coco["annotations"][0]["segmentation"] = []
    _save(root, coco)
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.train", "--config", str(DEMO_CONFIG), f"data.root={root}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "empty_segmentation" in proc.stderr and "data.on_invalid=skip" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_every_problem_at_once_is_found_the_same_by_one_process_and_by_several(tmp_path, synth_root):
    """The checks spread over worker processes find what one process finds, in the same order."""
    from instseg.data.check import check_dataset, format_report

    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    coco = _coco(root)
    anns, images = coco["annotations"], coco["images"]
    segmentations = [
        [[10, 10, 20, 20]],
        [[10, 10, 20, 20, 30]],
        [[10, 10, float("nan"), 20, 30, 40]],
        [[-5, 10, 20, 20, 30, 40]],
    ]
    segmentations += [[[10, 10, 500, 20, 30, 40]], [[10, 10, 20, 20, 30, 30]], []]
    for ann, segmentation in zip(anns, segmentations):
        ann["segmentation"] = segmentation
    anns[7]["bbox"], anns[8]["image_id"], anns[9]["category_id"], anns[10]["id"] = (
        [1, 1, 0, 5],
        99999,
        42,
        anns[11]["id"],
    )
    folder = root / "images" / "train"
    (folder / images[0]["file_name"]).unlink()
    (folder / images[1]["file_name"]).write_bytes(b"not an image")
    (folder / images[2]["file_name"]).write_bytes((folder / images[2]["file_name"]).read_bytes()[:400])
    images[3]["width"] += 7
    _save(root, coco)
    alone = check_dataset(root, workers=1)
    spread = check_dataset(root, workers=3)
    assert len(alone.problems) == 15 and format_report(spread) == format_report(alone)


def test_a_whole_jpeg_is_not_decoded_unless_asked_and_a_cut_one_always_is(tmp_path, synth_root, capsys):
    from instseg.data.validation import image_problems

    root = tmp_path / "images"
    shutil.copytree(synth_root, root)
    coco = _coco(root)
    first = root / "images" / "train" / coco["images"][0]["file_name"]
    whole = first.read_bytes()
    first.write_bytes(whole + b"\x00" * 8)  # padding after the end marker: still whole
    assert image_problems(first, 0, 0, "x") == []
    # the middle of the file garbled, its end intact: only --decode reads that far
    middle = len(whole) // 2
    first.write_bytes(whole[:middle] + bytes(range(200)) + whole[middle + 200 :])
    assert image_problems(first, 0, 0, "x") == []
    assert cli_main(["data", "check", str(root), "--decode"]) in (0, 1)
    capsys.readouterr()
    first.write_bytes(whole[:400])
    fast, decoded = image_problems(first, 0, 0, "x"), image_problems(first, 0, 0, "x", decode=True)
    assert [p.kind for p in fast] == ["image_unreadable"] and fast == decoded
