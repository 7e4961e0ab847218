"""The one `instseg` command: every command's help without heavy imports, one error handler for the aliases,
override typos answered with the closest key, `val`, and `predict` on folders and globs with image ids from a
COCO file (the predict -> metrics round trip on a converted coco8-seg)."""

import json
import subprocess
import sys

import pytest
import torch
from torchvision.io import read_image

from instseg.cli import main as cli_main
from instseg.config import ModelConfig
from instseg.data.coco import CocoInstanceDataset
from instseg.data.formats import convert
from instseg.models import build_model
from instseg.models.bundle import write_bundle
from tests.helpers import DEMO_CONFIG, OVERFIT_BAR, ROOT, overfit_config, shared_dataset

COMMANDS = [
    [],
    ["train"],
    ["tune"],
    ["flow", "run"],
    ["flow", "deploy"],
    ["job", "submit"],
    ["job", "status"],
    ["val"],
    ["predict"],
    ["metrics"],
    ["data", "check"],
    ["data", "convert"],
    ["runs", "clean"],
    ["models"],
    ["rollback"],
    ["register"],
    ["promote"],
]
HEAVY = ("torch", "torchvision", "ray", "mlflow", "prefect", "optuna", "matplotlib")


def test_every_help_answers_without_loading_torch_ray_mlflow_or_prefect():
    """What makes `instseg ... --help` answer at once (0.07 s here, against 7.5-9 s for the old python -m
    entry points): a command's libraries are imported when it runs, not when the parser is built."""
    script = (
        "import contextlib, io, json, sys\n"
        "from instseg.cli import main\n"
        f"for words in {COMMANDS!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            main([*words, '--help'])\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code == 0, words\n"
        "    assert 'usage: instseg' in out.getvalue(), words\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
    listing = subprocess.run([sys.executable, "-m", "instseg", "--help"], capture_output=True, text=True, cwd=ROOT)
    for command in ("train", "tune", "flow", "job", "val", "predict", "metrics", "data", "runs"):
        assert f"    {command} " in listing.stdout, listing.stdout


@pytest.mark.parametrize(
    "override, suggestion",
    [("train.epoch=3", "train.epochs"), ("data.batchsize=4", "data.batch_size"), ("trian.lr=0.1", "train.lr")],
)
def test_an_override_typo_names_the_override_and_the_closest_key(override, suggestion, capsys):
    code = cli_main(["train", "--config", str(DEMO_CONFIG), override])
    err = capsys.readouterr().err
    key = override.partition("=")[0]
    assert code == 2, err
    assert err == f"instseg: error: override '{override}': unknown config key '{key}' (did you mean {suggestion}?)\n"


def test_the_python_m_aliases_answer_like_instseg(tmp_path):
    """`python -m tuning.tune` is `instseg tune`: the same parser and the same one-line errors."""
    done = subprocess.run(
        [sys.executable, "-m", "tuning.tune", "--config", str(DEMO_CONFIG), "tune.num_sample=2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "instseg: error: override 'tune.num_sample=2': unknown config key 'tune.num_sample' "
        "(did you mean tune.num_samples?)"
    ]


def test_val_scores_a_model_on_a_split_like_metrics(overfit_root, overfit_weights, tmp_path, capsys):
    cfg = overfit_config(overfit_root, tmp_path)
    label_map = CocoInstanceDataset(overfit_root, "val").label_map
    model = build_model(cfg.model, label_map.num_classes)
    model.load_state_dict(torch.load(overfit_weights, weights_only=True))
    bundle = write_bundle(tmp_path / "bundle", model.state_dict(), cfg.model.model_dump(), label_map.to_dict())
    out = tmp_path / "val"
    code = cli_main(["val", "--model", str(bundle), "--data", str(overfit_root), "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith("segm: mAP50-95 "), printed
    report = json.loads((out / "metrics.json").read_text())
    assert report["segm_map50"] >= OVERFIT_BAR
    assert (out / "confusion_matrix.png").is_file() and (out / "predictions.json").is_file()
    # the same predictions through `instseg metrics` give the same numbers
    assert (
        cli_main(
            [
                "metrics",
                str(overfit_root / "annotations" / "instances_val.json"),
                str(out / "predictions.json"),
                "--out",
                str(tmp_path / "metrics"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "metrics" / "metrics.json").read_text())["segm_map"] == report["segm_map"]


@pytest.fixture(scope="module")
def coco8(tmp_path_factory):
    """coco8-seg converted (image ids 1..N, not the file names' numbers) and a tiny model of its classes."""
    root = tmp_path_factory.mktemp("coco8") / "coco8"
    convert(shared_dataset("coco8-seg"), root)
    label_map = CocoInstanceDataset(root, "val").label_map
    cfg = ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160, box_score_thresh=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, label_map.num_classes)
    bundle = write_bundle(root.parent / "bundle", model.state_dict(), cfg.model_dump(), label_map.to_dict())
    return root, bundle


def test_predict_then_metrics_round_trip_on_a_converted_dataset(coco8, tmp_path, capsys):
    root, bundle = coco8
    gt = root / "annotations" / "instances_val.json"
    images = root / "images" / "val"
    preds = tmp_path / "preds.json"
    assert cli_main(["predict", "--model", str(bundle), str(images), "--gt", str(gt), "--out", str(preds)]) == 0
    ids = {image["file_name"]: image["id"] for image in json.loads(gt.read_text())["images"]}
    results = json.loads(preds.read_text())
    assert results and {r["image_id"] for r in results} <= set(ids.values())
    assert cli_main(["metrics", str(gt), str(preds), "--out", str(tmp_path / "metrics")]) == 0
    capsys.readouterr()
    # without --gt the ids come from the file names (000000000036.jpg -> 36), which this GT does not use
    assert cli_main(["predict", "--model", str(bundle), str(images), "--out", str(preds)]) == 0
    assert cli_main(["metrics", str(gt), str(preds)]) == 2
    assert "is not an image of the ground truth" in capsys.readouterr().err


def test_predict_takes_globs_keeps_a_score_and_draws_each_image_at_its_size(coco8, tmp_path, capsys):
    root, bundle = coco8
    pattern = str(root / "images" / "val" / "*.jpg")
    drawn, preds = tmp_path / "drawn", tmp_path / "preds.json"
    args = ["predict", "--model", str(bundle), pattern, "--out", str(preds), "--conf", "0.05"]
    assert cli_main([*args, "--save-images", str(drawn)]) == 0
    assert "drawn in" in capsys.readouterr().out
    sources = sorted((root / "images" / "val").glob("*.jpg"))
    assert sorted(p.name for p in drawn.iterdir()) == sorted(f"{p.stem}.png" for p in sources)
    for source in sources:
        assert read_image(str(drawn / f"{source.stem}.png")).shape == read_image(str(source)).shape
    assert all(result["score"] >= 0.05 for result in json.loads(preds.read_text()))


@pytest.mark.parametrize(
    "images, expected",
    [(["nowhere/*.jpg"], "no files match nowhere/*.jpg"), (["missing.jpg"], "image not found: missing.jpg")],
)
def test_predict_names_what_it_could_not_find(images, expected, coco8, tmp_path, capsys):
    _, bundle = coco8
    code = cli_main(["predict", "--model", str(bundle), *images, "--out", str(tmp_path / "p.json")])
    assert code == 2 and capsys.readouterr().err == f"instseg: error: {expected}\n"


def test_predict_refuses_an_image_the_gt_file_does_not_list(coco8, tmp_path, capsys):
    root, bundle = coco8
    image = next((root / "images" / "train").glob("*.jpg"))
    gt = root / "annotations" / "instances_val.json"
    code = cli_main(["predict", "--model", str(bundle), str(image), "--gt", str(gt), "--out", str(tmp_path / "p.json")])
    assert code == 2 and f"no image with file_name {image.name}" in capsys.readouterr().err


def test_models_lists_versions_and_rollback_brings_the_previous_champion_back(coco8, tmp_path, capsys):
    from mlflow import MlflowClient

    from instseg.metrics.names import FITNESS
    from instseg.tracking.gate import promote
    from instseg.tracking.registry import aliases, register_bundle
    from instseg.tracking.runs import create_run

    _, bundle = coco8
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for fitness, previous in ((0.2, None), (0.5, 0.2)):
        run_id = create_run(uri, "exp", run_name=f"trained-{fitness}")
        MlflowClient(uri).set_terminated(run_id, "FINISHED")
        register_bundle(uri, run_id, bundle, "m")
        # the gate's scoring is its seam: promote downloads the two versions under folders named <role>-v<version>
        promote(
            uri,
            "m",
            lambda bundle, f=fitness, p=previous: {
                FITNESS: f if any(part.startswith("challenger-v") for part in bundle.parts) else p
            },
        )
    assert aliases(uri, "m")["champion"] == "2"

    assert cli_main(["models", "m", "--tracking-uri", uri]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:4] == ["2", "challenger,champion", "0.50000", "promoted"]
    assert rows[2].split()[:3] == ["1", "-", "0.20000"]

    assert cli_main(["rollback", "m", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out == "m: champion moved from version 2 back to version 1\n"
    assert aliases(uri, "m")["champion"] == "1"
    assert cli_main(["rollback", "m", "--tracking-uri", uri]) == 2  # version 1 replaced no champion
    assert "no earlier one to roll back to" in capsys.readouterr().err
    assert cli_main(["models", "nothing-registered", "--tracking-uri", uri]) == 2


def test_register_and_promote_by_hand_run_the_flows_gate(overfit_root, overfit_weights, tmp_path, capsys):
    """Two training runs' bundles (random and trained weights) registered with `instseg register`, then
    `instseg promote` scores challenger and champion on the config's val split, as the flow does."""
    from instseg.tracking.registry import aliases
    from instseg.tracking.runs import RunLogger, create_run

    cfg = overfit_config(overfit_root, tmp_path)
    uri = cfg.tracking.uri
    label_map = CocoInstanceDataset(overfit_root, "val").label_map
    runs = {}
    for name, weights in (("random", None), ("trained", overfit_weights)):
        torch.manual_seed(0)
        model = build_model(cfg.model, label_map.num_classes)
        if weights is not None:
            model.load_state_dict(torch.load(weights, weights_only=True))
        bundle = write_bundle(
            tmp_path / name / "bundle", model.state_dict(), cfg.model.model_dump(), label_map.to_dict()
        )
        runs[name] = create_run(uri, "exp", run_name=name)
        for file in bundle.iterdir():
            RunLogger(uri, runs[name]).log_artifact(file, "bundle")
    config = ["--config", str(DEMO_CONFIG), f"data.root={overfit_root}", f"tracking.uri={uri}"]

    assert cli_main(["register", "m", "--run", runs["random"], "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out == f"registered run {runs['random']} as m version 1 (challenger)\n"
    assert cli_main(["promote", "m", *config]) == 0
    assert "no champion yet: promoted; champion is now v1" in capsys.readouterr().out

    assert cli_main(["register", "m", "--run", runs["trained"], "--tracking-uri", uri]) == 0
    assert cli_main(["promote", "m", *config]) == 0
    printed = capsys.readouterr().out
    assert "challenger v2 fitness" in printed and "vs champion v1 fitness" in printed, printed
    assert printed.rstrip().endswith("promoted; champion is now v2")
    assert aliases(uri, "m") == {"challenger": "2", "champion": "2"}

    # an older version put back up as the challenger loses to the trained champion
    assert cli_main(["promote", "m", "--version", "1", *config]) == 0
    assert capsys.readouterr().out.rstrip().endswith("kept champion; champion is now v2")
    assert aliases(uri, "m") == {"challenger": "1", "champion": "2"}
    assert cli_main(["promote", "m", "--version", "9", *config]) == 2
    assert "registered model 'm' has no version 9" in capsys.readouterr().err


def test_predict_never_draws_over_a_file(coco8, tmp_path, capsys):
    root, bundle = coco8
    images = sorted((root / "images" / "val").glob("*.jpg"))
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    mine = drawn / f"{images[0].stem}.png"
    mine.write_bytes(b"the user's own file")
    args = ["predict", "--model", str(bundle), str(images[0]), "--out", str(tmp_path / "p.json")]
    assert cli_main([*args, "--save-images", str(drawn)]) == 2
    assert f"{mine.name} is already there" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's own file"
    assert cli_main([*args, "--save-images", str(mine)]) == 2
    assert "that is a file, not a folder" in capsys.readouterr().err
    twin = tmp_path / "other" / images[0].name
    twin.parent.mkdir()
    twin.write_bytes(images[0].read_bytes())
    both = ["predict", "--model", str(bundle), str(images[0]), str(twin), "--out", str(tmp_path / "p.json")]
    assert cli_main([*both, "--save-images", str(tmp_path / "new")]) == 2
    assert f"would both be drawn as {mine.name}" in capsys.readouterr().err
