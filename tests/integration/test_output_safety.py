"""Commands never delete or overwrite what they did not create: refusal of foreign folders, an --overwrite
that survives being killed mid-swap, distinct images of the same name, no file taken from outside a
dataset, whole files only, and modes that follow the umask."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instseg.cli import main as cli_main
from instseg.data.files import STAGING_MARK, staged_folder
from instseg.data.rle import to_rle
from tests.helpers import shared_dataset

pytestmark = pytest.mark.integration

INSTSEG = [sys.executable, "-c", "import sys; from instseg.cli import main; sys.exit(main())"]


def _dataset_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_and_synth_refuse_a_folder_they_did_not_write(synth_root, tmp_path, capsys):
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.txt").write_text("four years of work")
    for argv in (["data", "convert", str(synth_root), str(important)], ["data", "synth", str(important)]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "is not empty and was not written by instseg" in err and "--overwrite" in err
        assert (important / "thesis.txt").read_text() == "four years of work"
    # a file where the folder should go, and the parent of the source
    (tmp_path / "afile").write_text("x")
    assert cli_main(["data", "convert", str(synth_root), str(tmp_path / "afile")]) == 2
    assert cli_main(["data", "convert", str(synth_root), str(synth_root.parent)]) == 2
    assert (tmp_path / "afile").read_text() == "x" and synth_root.is_dir()
    # our own output is replaced without asking: that is rerunning a command
    out = tmp_path / "out"
    assert cli_main(["data", "convert", str(synth_root), str(out)]) == 0
    assert cli_main(["data", "convert", str(synth_root), str(out)]) == 0
    assert cli_main(["data", "synth", str(tmp_path / "s"), "--images", "4"]) == 0
    assert cli_main(["data", "synth", str(tmp_path / "s"), "--images", "6"]) == 0
    # ... unless someone added to it
    (out / "notes.txt").write_text("mine")
    assert cli_main(["data", "convert", str(synth_root), str(out)]) == 2
    assert cli_main(["data", "convert", str(synth_root), str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    assert not list(tmp_path.glob(f"{STAGING_MARK}*")), "no staging folder left behind"


def test_overwrite_survives_being_killed_at_any_moment(tmp_path):
    """convert --overwrite of coco128-seg killed (SIGKILL, then SIGINT) at spread-out moments: the
    destination is always either the old folder, whole, or the new dataset, whole."""
    source = shared_dataset("coco128-seg")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("the old folder")
    subprocess.run(
        [*INSTSEG, "data", "convert", str(source), str(tmp_path / "reference"), "--names", "coco80"], check=True
    )
    complete = _dataset_files(tmp_path / "reference")
    started = time.perf_counter()
    subprocess.run([*INSTSEG, "data", "convert", str(source), str(tmp_path / "timed"), "--names", "coco80"], check=True)
    duration = time.perf_counter() - started
    outcomes = []
    for index, fraction in enumerate(np.linspace(0.3, 1.0, 8)):
        process = subprocess.Popen(
            [*INSTSEG, "data", "convert", str(source), str(dst), "--names", "coco80", "--overwrite"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL if index % 2 == 0 else signal.SIGINT)
        process.wait()
        state = _dataset_files(dst)
        assert state in ({"old.txt": len("the old folder")}, complete), f"half a folder after a kill at {fraction:.2f}"
        outcomes.append("new" if state == complete else "old")
        if state == complete:  # start the next try from the old folder again
            shutil.rmtree(dst)
            dst.mkdir()
            (dst / "old.txt").write_text("the old folder")
    subprocess.run([*INSTSEG, "data", "convert", str(source), str(dst), "--names", "coco80", "--overwrite"], check=True)
    assert _dataset_files(dst) == complete
    assert not list(tmp_path.glob(f"{STAGING_MARK}*")), "the next run removes what killed runs left"
    print("kill outcomes:", outcomes)


def test_staged_folder_keeps_the_old_folder_when_the_build_fails(tmp_path):
    destination = tmp_path / "d"
    destination.mkdir()
    (destination / "keep").write_text("1")
    with pytest.raises(KeyboardInterrupt), staged_folder(destination) as staging:
        (staging / "half").write_text("2")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and (destination / "keep").read_text() == "1"


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30, 3), value, dtype=np.uint8)).save(path)


def _coco(images: list[tuple[int, str]]) -> dict:
    polygon = [[2.0, 2.0, 20.0, 2.0, 20.0, 15.0]]
    return {
        "images": [{"id": i, "file_name": name, "width": 30, "height": 20} for i, name in images],
        "annotations": [
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "segmentation": polygon,
                "bbox": [2, 2, 18, 13],
                "area": 117.0,
                "iscrowd": 0,
            }
            for i, _ in images
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


def test_images_of_the_same_name_in_different_folders_stay_distinct(tmp_path, capsys):
    src = tmp_path / "src"
    _image(src / "images" / "train" / "a" / "x.png", 10)
    _image(src / "images" / "train" / "b" / "x.png", 200)
    (src / "annotations").mkdir()
    (src / "annotations" / "instances_train.json").write_text(json.dumps(_coco([(1, "a/x.png"), (2, "b/x.png")])))
    assert cli_main(["data", "convert", str(src), str(tmp_path / "out")]) == 0
    coco = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    pixels = {
        img["id"]: np.asarray(Image.open(tmp_path / "out" / "images" / "train" / img["file_name"]))[0, 0, 0]
        for img in coco["images"]
    }
    assert pixels == {1: 10, 2: 200}, "each annotation still describes its own image"


def test_no_file_from_outside_the_dataset_is_read_or_copied(tmp_path, capsys):
    secret = tmp_path / "secret.png"
    _image(secret, 77)
    src = tmp_path / "src"
    _image(src / "images" / "train" / "ok.png", 1)
    (src / "annotations").mkdir()
    images = [(1, "ok.png"), (2, "../../../secret.png"), (3, str(secret))]
    (src / "annotations" / "instances_train.json").write_text(json.dumps(_coco(images)))
    assert cli_main(["data", "check", str(src)]) == 1
    out = capsys.readouterr().out
    assert out.count("image_outside_dataset") == 3  # the count line and two problems
    assert "image id 2" in out and "image id 3" in out
    assert cli_main(["data", "convert", str(src), str(tmp_path / "out")]) == 0
    copied = [p.name for p in (tmp_path / "out").rglob("*.png")]
    assert copied == ["ok.png"]
    assert cli_main(["data", "check", str(tmp_path / "out")]) == 0


def test_outputs_follow_the_umask(synth_root, tmp_path):
    """Folders 0755 and files 0644 under umask 022: a teammate or a shared artifact store can read them."""
    from instseg.config import ModelConfig
    from instseg.models import build_model
    from instseg.models.bundle import write_bundle

    old = os.umask(0o022)
    try:
        assert cli_main(["data", "convert", str(synth_root), str(tmp_path / "out")]) == 0
        cfg = ModelConfig(arch="tiny", weights="none", min_size=128, max_size=160)
        bundle = write_bundle(
            tmp_path / "bundle",
            build_model(cfg, 4).state_dict(),
            cfg.model_dump(),
            {"category_ids": [1, 2, 3], "names": list("abc")},
        )
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777
        for p in [tmp_path / "out", *(tmp_path / "out").rglob("*"), *bundle.iterdir()]
    }
    written = {
        path: mode for path, mode in modes.items() if not path.endswith(".jpg")
    }  # images are the source's own (hard links)
    assert written["out"] == 0o755 and written["out/annotations"] == 0o755
    assert written["out/annotations/instances_train.json"] == 0o644
    assert written["bundle/weights.pt"] == 0o644 and written["bundle/model.json"] == 0o644


def test_a_write_that_fails_leaves_the_old_metrics_and_no_temp_file(synth_root, tmp_path):
    """metrics under a 1 KiB file-size limit (ulimit -f 1): the write fails, the earlier metrics.json stays
    whole, nothing half-written is left, and the failure is one line, not a traceback."""
    gt = synth_root / "annotations" / "instances_val.json"
    coco = json.loads(gt.read_text())
    image = {i["id"]: i for i in coco["images"]}
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "score": 0.9,
            "segmentation": to_rle(a["segmentation"], image[a["image_id"]]["height"], image[a["image_id"]]["width"]),
        }
        for a in coco["annotations"]
    ]
    for result in results:
        result["segmentation"]["counts"] = result["segmentation"]["counts"].decode()
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "m"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # noqa: E731
    env = {**os.environ, "INSTSEG_LOG_DIR": str(tmp_path / "logs")}
    run = subprocess.run(
        [*INSTSEG, "metrics", str(gt), str(tmp_path / "results.json"), "--out", str(out)],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        env=env,
    )
    assert (
        run.returncode == 1 and run.stderr.startswith("instseg: error: cannot write") and "File too large" in run.stderr
    ), run.stderr
    assert "Traceback" not in run.stderr
    assert (out / "metrics.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_without_an_atomic_exchange_an_interrupted_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Where renameat2 cannot swap, the old folder moves aside and the new one moves in: interrupted between
    the two moves, the old folder is back under its name before the interrupt leaves staged_folder."""
    from instseg.data import files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    destination = tmp_path / "d"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with staged_folder(destination) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in destination.iterdir()) == ["new.txt"]
    real_replace, moves = os.replace, []

    def interrupted_second_move(source, target):
        moves.append(target)
        if len(moves) == 2:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", interrupted_second_move)
    with pytest.raises(KeyboardInterrupt), staged_folder(destination) as staging:
        (staging / "newer.txt").write_text("newer")
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert sorted(p.name for p in destination.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
