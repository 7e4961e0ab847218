"""A table of malformed inputs to every command that reads a user's files: each ends with its exit code
(2: usage, config or data; 1: `data check` found problems) and a message that names the file and the
offending item, never a traceback. Every case starts from a copy of the small synthetic dataset."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from instseg.cli import main as cli_main
from instseg.config import ModelConfig
from instseg.models import build_model
from instseg.models.bundle import write_bundle
from ray_jobs.cli_common import run_cli
from ray_jobs.train import main as train_main
from tests.helpers import DEMO_CONFIG, isolated_overrides

TRAIN_JSON = "annotations/instances_train.json"
VAL_JSON = "annotations/instances_val.json"
RLE_SEGMENTATION = {"size": [0, 0], "counts": "garbage!!"}  # size filled in per image


def _edit(relative: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """A setup that rewrites one JSON file of the dataset copy with change(data) -> new data."""

    def setup(root: Path) -> None:
        path = root / relative
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return setup


def _raw(relative: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / relative).write_bytes(content)


def _first(key: str, **values: Any) -> Callable[[Any], Any]:
    """Set fields of the first item of images / annotations / categories (a value None deletes the field)."""

    def change(coco: dict) -> dict:
        for name, value in values.items():
            if value is None:
                coco[key][0].pop(name, None)
            else:
                coco[key][0][name] = value
        return coco

    return change


def _rle(counts: Any, size: Any = "image") -> Callable[[Any], Any]:
    def change(coco: dict) -> dict:
        image = next(i for i in coco["images"] if i["id"] == coco["annotations"][0]["image_id"])
        rle = {"counts": counts, "size": [image["height"], image["width"]] if size == "image" else size}
        coco["annotations"][0]["segmentation"] = {k: v for k, v in rle.items() if v is not None}
        return coco

    return change


def _set(key: str, value: Any) -> Callable[[Any], Any]:
    return lambda coco: {**coco, key: value}


ANN = "annotation id 1"  # the first training annotation of the synthetic data
IMG = "image id 1"

# (case id, setup of the dataset copy, expected exit, text the message must contain)
DATA_CHECK_CASES = [
    ("json-is-list", _edit(TRAIN_JSON, lambda c: [c]), 2, ["instances_train.json", "not a list"]),
    ("json-is-number", _edit(TRAIN_JSON, lambda c: 5), 2, ["instances_train.json", "not a int"]),
    ("not-json", _raw(TRAIN_JSON, b"{images: oops"), 2, ["instances_train.json", "not readable JSON"]),
    ("empty-file", _raw(TRAIN_JSON, b""), 2, ["instances_train.json", "not readable JSON"]),
    ("binary-file", _raw(TRAIN_JSON, b"\xff\xfe\x00\x81"), 2, ["instances_train.json"]),
    (
        "images-missing",
        _edit(TRAIN_JSON, lambda c: {k: v for k, v in c.items() if k != "images"}),
        2,
        ["instances_train.json", "'images' is missing"],
    ),
    (
        "images-of-numbers",
        _edit(TRAIN_JSON, _set("images", [1, 2])),
        2,
        ["instances_train.json", "images[0] must be an object"],
    ),
    (
        "annotations-of-strings",
        _edit(TRAIN_JSON, _set("annotations", ["x"])),
        2,
        ["instances_train.json", "annotations[0]"],
    ),
    (
        "categories-a-dict",
        _edit(TRAIN_JSON, _set("categories", {"1": "circle"})),
        2,
        ["instances_train.json", "'categories' must be a list"],
    ),
    ("image-id-string", _edit(TRAIN_JSON, _first("images", id="1")), 2, ["instances_train.json", "images[0]", "'id'"]),
    ("image-id-bool", _edit(TRAIN_JSON, _first("images", id=True)), 2, ["instances_train.json", "images[0]", "'id'"]),
    (
        "width-a-word",
        _edit(TRAIN_JSON, _first("images", width="wide")),
        2,
        ["instances_train.json", IMG, "'width'", "wide"],
    ),
    ("height-negative", _edit(TRAIN_JSON, _first("images", height=-5)), 2, ["instances_train.json", IMG, "'height'"]),
    (
        "annotation-without-id",
        _edit(TRAIN_JSON, _first("annotations", id=None)),
        2,
        ["instances_train.json", "annotations[0]", "'id'"],
    ),
    (
        "annotation-image-id-list",
        _edit(TRAIN_JSON, _first("annotations", image_id=[1])),
        2,
        ["instances_train.json", "annotations[0]", "'image_id'"],
    ),
    ("category-name-number", _edit(TRAIN_JSON, _first("categories", name=7)), 2, ["instances_train.json", "'name'"]),
    (
        "segmentation-a-number",
        _edit(TRAIN_JSON, _first("annotations", segmentation=5)),
        1,
        ["instances_train.json", ANN, "bad_segmentation"],
    ),
    (
        "segmentation-flat-list",
        _edit(TRAIN_JSON, _first("annotations", segmentation=[1, 1, 9, 1, 9, 9])),
        1,
        [ANN, "bad_segmentation", "flat list"],
    ),
    (
        "segmentation-list-with-number",
        _edit(TRAIN_JSON, _first("annotations", segmentation=[[1, 1, 9, 1, 9, 9], 5])),
        1,
        [ANN, "bad_segmentation"],
    ),
    (
        "segmentation-a-string",
        _edit(TRAIN_JSON, _first("annotations", segmentation="polygon")),
        1,
        [ANN, "bad_segmentation"],
    ),
    (
        "polygon-of-strings",
        _edit(TRAIN_JSON, _first("annotations", segmentation=[["a", "b", "c", "d", "e", "f"]])),
        1,
        [ANN, "coordinate_not_finite"],
    ),
    ("polygon-nan", _raw(TRAIN_JSON, b""), None, []),  # filled below: JSON NaN needs the raw text
    ("rle-without-size", _edit(TRAIN_JSON, _rle("PPYo0", size=None)), 1, [ANN, "bad_segmentation", "'size'"]),
    ("rle-size-a-string", _edit(TRAIN_JSON, _rle("PPYo0", size="10x10")), 1, [ANN, "bad_segmentation", "'size'"]),
    ("rle-garbage-counts", _edit(TRAIN_JSON, _rle("garbage!!")), 1, [ANN, "bad_segmentation"]),
    ("rle-short-counts", _edit(TRAIN_JSON, _rle([5, 10])), 1, [ANN, "bad_segmentation", "do not cover"]),
    ("rle-negative-counts", _edit(TRAIN_JSON, _rle([-3, 103])), 1, [ANN, "bad_segmentation"]),
    ("rle-counts-a-number", _edit(TRAIN_JSON, _rle(12)), 1, [ANN, "bad_segmentation", "'counts'"]),
    ("category-id-list", _edit(TRAIN_JSON, _first("annotations", category_id=[1])), 1, [ANN, "unknown_category"]),
    (
        "category-id-unknown",
        _edit(TRAIN_JSON, _first("annotations", category_id=999)),
        1,
        [ANN, "unknown_category", "999"],
    ),
    ("area-a-word", _edit(TRAIN_JSON, _first("annotations", area="big")), 1, [ANN, "bad_area"]),
    ("area-missing", _edit(TRAIN_JSON, _first("annotations", area=None)), 1, [ANN, "bad_area"]),
    ("bbox-a-word", _edit(TRAIN_JSON, _first("annotations", bbox="box")), 1, [ANN, "coordinate_not_finite", "bbox"]),
    (
        "annotation-of-unknown-image",
        _edit(TRAIN_JSON, _first("annotations", image_id=99999)),
        1,
        ["annotation id 1 (image id 99999)", "unknown_image"],
    ),
    (
        "file-name-absolute",
        _edit(TRAIN_JSON, _first("images", file_name="/etc/hostname")),
        1,
        [IMG, "image_outside_dataset"],
    ),
    (
        "file-name-climbs-out",
        _edit(TRAIN_JSON, _first("images", file_name="../../../../etc/hostname")),
        1,
        [IMG, "image_outside_dataset"],
    ),
    ("file-name-a-number", _edit(TRAIN_JSON, _first("images", file_name=17)), 1, [IMG, "image_outside_dataset"]),
    (
        "image-file-missing",
        _edit(TRAIN_JSON, _first("images", file_name="nope.jpg")),
        1,
        [IMG, "image_missing", "nope.jpg"],
    ),
]
DATA_CHECK_CASES[[c[0] for c in DATA_CHECK_CASES].index("polygon-nan")] = (
    "polygon-nan",
    lambda root: (root / TRAIN_JSON).write_text(
        re.sub(r'"segmentation":\s*\[\[', '"segmentation": [[NaN, NaN, ', (root / TRAIN_JSON).read_text(), count=1)
    ),
    1,
    [ANN, "coordinate_not_finite"],
)


@pytest.fixture
def dataset(synth_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    return root


def _assert_clean_failure(captured: Any, code: int, expected_code: int, expected: list[str]) -> None:
    text = captured.out + captured.err
    assert code == expected_code, text
    assert "Traceback" not in text
    for part in expected:
        assert part in text, f"{part!r} not in {text!r}"


@pytest.mark.parametrize("case, setup, expected_code, expected", DATA_CHECK_CASES, ids=[c[0] for c in DATA_CHECK_CASES])
def test_data_check_names_every_malformed_input(case, setup, expected_code, expected, dataset, capsys):
    setup(dataset)
    code = cli_main(["data", "check", str(dataset)])
    _assert_clean_failure(capsys.readouterr(), code, expected_code, expected)


# the same files given to training stop in the driver, before Ray starts, with exit 2
TRAINING_DATA_CASES = [
    c
    for c in DATA_CHECK_CASES
    if c[0]
    in (
        "json-is-list",
        "annotations-of-strings",
        "width-a-word",
        "segmentation-a-number",
        "rle-garbage-counts",
        "rle-short-counts",
        "file-name-absolute",
        "area-missing",
    )
]


@pytest.mark.parametrize("case, setup, _, expected", TRAINING_DATA_CASES, ids=[c[0] for c in TRAINING_DATA_CASES])
def test_training_refuses_malformed_data_before_ray(case, setup, _, expected, dataset, tmp_path, capsys):
    setup(dataset)
    code = run_cli(train_main, ["--config", str(DEMO_CONFIG), *isolated_overrides(dataset, tmp_path)])
    _assert_clean_failure(
        capsys.readouterr(), code, 2, [e for e in expected if e not in (ANN, IMG)] + ["instances_train.json"]
    )


CONFIG_CASES = [
    ("epochs-true", ["train.epochs=true"], ["train.epochs", "boolean"]),
    ("lr-yes", ["train.lr=yes"], ["train.lr", "boolean"]),
    ("batch-zero", ["data.batch_size=0"], ["data.batch_size"]),
    ("unknown-key", ["train.epoch=3"], ["train.epoch"]),
    ("not-key-value", ["epochs"], ["epochs", "section.key=value"]),
    ("weights-not-a-file-kind", ["model.weights=foo.bin"], ["model.weights"]),
    ("weights-missing-file", ["model.weights=/nonexistent/w.pt"], ["model.weights", "not found"]),
    ("data-root-missing", ["data.root=/nonexistent/data"], ["/nonexistent/data"]),
    ("run-name-with-slash", ["run_name=a/b"], ["run_name"]),
]


@pytest.mark.parametrize("case, overrides, expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_training_config_mistakes_are_one_line(case, overrides, expected, synth_root, tmp_path, capsys):
    code = run_cli(train_main, ["--config", str(DEMO_CONFIG), *isolated_overrides(synth_root, tmp_path), *overrides])
    _assert_clean_failure(capsys.readouterr(), code, 2, expected)


def test_config_files_that_are_not_configs(tmp_path, capsys):
    for content, expected in (
        (b"train: [epochs: 3", "not valid YAML"),
        (b"- 1\n- 2\n", "mapping"),
        (b"\xff\xfe", "config"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_bytes(content)
        code = run_cli(train_main, ["--config", str(path)])
        _assert_clean_failure(
            capsys.readouterr(), code, 2, [str(path) if expected != "config" else "bad.yaml", expected]
        )


def test_a_weights_file_that_is_text_stops_in_the_driver(synth_root, tmp_path, capsys):
    fake = tmp_path / "w.pt"
    fake.write_text("not a tensor file")
    code = run_cli(
        train_main, ["--config", str(DEMO_CONFIG), *isolated_overrides(synth_root, tmp_path), f"model.weights={fake}"]
    )
    _assert_clean_failure(capsys.readouterr(), code, 2, [str(fake), "not a readable state dict"])


def _detection(gt: dict, **change: Any) -> dict:
    image = gt["images"][0]
    rle = {"size": [image["height"], image["width"]], "counts": f"{image['height'] * image['width']}"}
    base = {
        "image_id": image["id"],
        "category_id": gt["categories"][0]["id"],
        "score": 0.9,
        "segmentation": rle,
        "bbox": [1, 1, 5, 5],
    }
    return {k: v for k, v in {**base, **change}.items() if v is not None}


METRICS_CASES = [
    ("results-of-numbers", lambda gt: [1, 2], "results.json", ["results.json", "detection 0 must be an object"]),
    ("results-a-dict", lambda gt: {"a": 1}, "results.json", ["results.json", "JSON list"]),
    ("image-id-a-list", lambda gt: [_detection(gt, image_id=[1])], "results.json", ["detection 0", "image_id [1]"]),
    ("image-id-unknown", lambda gt: [_detection(gt, image_id=424242)], "results.json", ["detection 0", "424242"]),
    (
        "no-segmentation",
        lambda gt: [_detection(gt, segmentation=None)],
        "results.json",
        ["detection 0", "'segmentation'"],
    ),
    ("no-score", lambda gt: [_detection(gt, score=None)], "results.json", ["detection 0", "'score'"]),
    ("score-a-string", lambda gt: [_detection(gt, score="high")], "results.json", ["detection 0", "'score'", "high"]),
    (
        "category-not-in-gt",
        lambda gt: [_detection(gt, category_id=77)],
        "results.json",
        ["detection 0", "category_id 77"],
    ),
    (
        "rle-garbage",
        lambda gt: [_detection(gt, segmentation={"size": [5, 5], "counts": "!!"})],
        "results.json",
        ["detection 0", "segmentation"],
    ),
    (
        "rle-other-size",
        lambda gt: [_detection(gt, segmentation={"size": [2, 2], "counts": [4]})],
        "results.json",
        ["detection 0", "RLE size [2, 2]"],
    ),
    ("gt-a-list", lambda gt: [gt], "gt.json", ["gt.json", "not a list"]),
]


@pytest.mark.parametrize("case, make, target, expected", METRICS_CASES, ids=[c[0] for c in METRICS_CASES])
def test_metrics_names_the_bad_detection(case, make, target, expected, synth_root, tmp_path, capsys):
    gt = json.loads((synth_root / VAL_JSON).read_text())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps([_detection(gt)]))
    (tmp_path / target).write_text(json.dumps(make(gt)))
    code = cli_main(
        ["metrics", str(tmp_path / "gt.json"), str(tmp_path / "results.json"), "--out", str(tmp_path / "m")]
    )
    _assert_clean_failure(capsys.readouterr(), code, 2, expected)


def test_metrics_files_that_are_not_json(synth_root, tmp_path, capsys):
    gt, results = tmp_path / "gt.json", tmp_path / "results.json"
    results.write_text("[]")
    gt.write_text("{oops")
    code = cli_main(["metrics", str(gt), str(results)])
    _assert_clean_failure(capsys.readouterr(), code, 2, [str(gt), "not readable JSON"])
    shutil.copy(synth_root / VAL_JSON, gt)
    results.write_text("[{oops")
    code = cli_main(["metrics", str(gt), str(results)])
    _assert_clean_failure(capsys.readouterr(), code, 2, [str(results), "not JSON"])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    cfg = ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160)
    folder = tmp_path_factory.mktemp("bundle") / "bundle"
    label_map = {"category_ids": [1, 2, 3], "names": ["a", "b", "c"]}
    return write_bundle(folder, build_model(cfg, 4).state_dict(), cfg.model_dump(), label_map)


def _pickled_object(path: Path) -> None:
    path.write_bytes(pickle.dumps({"model": argparse.Namespace(payload="arbitrary code would run here")}))


PREDICT_CASES = [
    (
        "text-as-checkpoint",
        lambda tmp, b: (tmp / "model.pt").write_text("hello"),
        "model.pt",
        ["model.pt", "not a checkpoint"],
    ),
    (
        "pickle-as-checkpoint",
        lambda tmp, b: _pickled_object(tmp / "model.pt"),
        "model.pt",
        ["model.pt", "weights_only"],
    ),
    (
        "tensor-as-checkpoint",
        lambda tmp, b: torch.save(torch.zeros(3), tmp / "model.pt"),
        "model.pt",
        ["model.pt", "not a training checkpoint"],
    ),
    ("bundle-weights-file", lambda tmp, b: None, "BUNDLE/weights.pt", ["weights.pt", "give the bundle folder"]),
    ("no-such-model", lambda tmp, b: None, "missing.pt", ["model not found", "missing.pt"]),
    (
        "bundle-meta-not-json",
        lambda tmp, b: (shutil.copytree(b, tmp / "b2"), (tmp / "b2" / "model.json").write_text("{")),
        "b2",
        ["model.json", "not JSON"],
    ),
    (
        "bundle-meta-wrong",
        lambda tmp, b: (shutil.copytree(b, tmp / "b2"), (tmp / "b2" / "model.json").write_text("{}")),
        "b2",
        ["model.json", "not a bundle"],
    ),
]


@pytest.mark.parametrize("case, setup, model, expected", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_refuses_what_is_not_a_model(case, setup, model, expected, bundle, synth_root, tmp_path, capsys):
    setup(tmp_path, bundle)
    model_path = str(bundle / "weights.pt") if model == "BUNDLE/weights.pt" else str(tmp_path / model)
    image = next((synth_root / "images" / "val").glob("*.jpg"))
    code = cli_main(["predict", "--model", model_path, str(image), "--out", str(tmp_path / "p.json")])
    _assert_clean_failure(capsys.readouterr(), code, 2, expected)
    assert not (tmp_path / "p.json").exists()


def test_predict_on_a_file_that_is_not_an_image(bundle, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    code = cli_main(["predict", "--model", str(bundle), str(text), "--out", str(tmp_path / "p.json")])
    _assert_clean_failure(capsys.readouterr(), code, 2, ["cannot read image", "notes.jpg"])


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--device", "tpu"], ["--device tpu", "auto, cpu, cuda or cuda:N"]),
        (["--device", "cuda:x"], ["--device cuda:x", "auto, cpu, cuda or cuda:N"]),
        (["--batch", "0"], ["--batch 0", "at least 1"]),
    ]
    + ([(["--device", "cuda"], ["--device cuda", "no CUDA device"])] if not torch.cuda.is_available() else []),
)
def test_predict_refuses_a_device_or_batch_it_cannot_use(options, expected, bundle, synth_root, tmp_path, capsys):
    image = next((synth_root / "images" / "val").glob("*.jpg"))
    code = cli_main(["predict", "--model", str(bundle), str(image), "--out", str(tmp_path / "p.json"), *options])
    _assert_clean_failure(capsys.readouterr(), code, 2, expected)


def test_predict_on_the_cpu_in_batches_matches_one_by_one(bundle, synth_root, tmp_path, capsys):
    images = sorted((synth_root / "images" / "val").glob("*.jpg"))[:3]
    for batch in ("1", "3"):
        assert (
            cli_main(
                [
                    "predict",
                    "--model",
                    str(bundle),
                    *map(str, images),
                    "--out",
                    str(tmp_path / f"{batch}.json"),
                    "--device",
                    "cpu",
                    "--batch",
                    batch,
                ]
            )
            == 0
        )
    assert "(cpu)" in capsys.readouterr().out
    one, three = (json.loads((tmp_path / f"{b}.json").read_text()) for b in ("1", "3"))
    assert [r["image_id"] for r in one] == [r["image_id"] for r in three]
    assert [r["segmentation"] for r in one] == [r["segmentation"] for r in three]


def test_convert_and_synth_refuse_what_they_cannot_use(dataset, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["data", "convert", str(tmp_path / "empty"), str(tmp_path / "out")], ["empty", "no known dataset layout"]),
        (
            ["data", "convert", str(dataset), str(dataset / "images" / "converted")],
            ["must not be, contain or lie inside"],
        ),
        (["data", "convert", str(dataset), str(dataset)], ["must not be, contain or lie inside"]),
        (["data", "synth", str(tmp_path / "s"), "--images", "1"], ["at least 2 images"]),
    ]
    for argv, expected in cases:
        code = cli_main(argv)
        _assert_clean_failure(capsys.readouterr(), code, 2, expected)
    _edit(TRAIN_JSON, lambda c: [c])(dataset)
    code = cli_main(["data", "convert", str(dataset), str(tmp_path / "o")])
    _assert_clean_failure(capsys.readouterr(), code, 2, ["instances_train.json", "not a list"])
    assert not (tmp_path / "o").exists()


def test_our_own_bug_is_one_line_and_a_log_file(tmp_path, monkeypatch, capsys):
    """An exception that is not a user mistake: exit 1, one line that points at the log, the traceback there."""
    from instseg.data import check

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(check, "check_dataset", broken)
    monkeypatch.setenv("INSTSEG_LOG_DIR", str(tmp_path / "logs"))
    code = cli_main(["data", "check", str(tmp_path)])
    err = capsys.readouterr().err
    (log,) = (tmp_path / "logs").glob("*.log")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error (ZeroDivisionError: a bug of ours), please report it" in err and str(log) in err
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()


def test_an_error_line_never_fails_itself_and_never_shows_a_password():
    """first_line is what every one-line message quotes of an exception: an exception without a message
    (KeyError()) gives its type instead of an IndexError in the middle of error handling."""
    from instseg.errors import first_line

    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("\n  connect to http://alice:s3/cr@t@host:5000 failed\nmore")) == (
        "connect to http://***@host:5000 failed"
    )
    assert len(first_line(ValueError("x" * 500))) == 200
