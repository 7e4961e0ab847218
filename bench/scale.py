"""COCO-sized data: every step that reads a dataset, ours beside its floor, measured in one run on data with COCO
2017's counts (bench/scale_data.py makes it: 118,287 + 5,000 images, 859,348 + 36,431 polygons, a results file of
100 detections per val image).

    .venv/bin/python bench/scale.py [--scale 0.1] [--data DIR] [--only index,check,...] [--workers 4]

Rows (each in a fresh process; seconds, peak memory (RSS of the process tree's largest process), ratio to floor):
  index build        ensure_index of train2017 from nothing     | pycocotools COCO(): json load + index
  dataset init       CocoInstanceDataset, index folder handed over (what a Train worker does) | the same floor
  dataset find       CocoInstanceDataset finding its index (fingerprint, no build)          | the same floor
  loader USS         private memory (USS) of each of --workers DataLoader workers after reading every image's
                     annotations and decoding every mask crop | a worker that read nothing
  data check         `instseg data check ROOT`                  | pycocotools COCO() of both splits
  data split         `instseg data split --val 0.05` of train2017 | the same floor
  data convert       `instseg data convert ROOT DST` (COCO -> COCO) | the same floor
  metrics            `instseg metrics` of the results file       | faster-coco-eval alone scoring it
  train first step   `instseg train` to its first step (index built) | the same on the demo's 256 images
  study first steps  `instseg tune` (2 trials) to each trial's first step | the same on the demo's data

The data folder is reused between runs (--data, default /tmp/instseg-scale-<scale>); its index cache is cleared
first so that the index build row builds. `--scale 0.1` is a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TRAIN, VAL = "train2017", "val2017"
INSTSEG = [sys.executable, "-m", "instseg"]
FIRST_STEP = re.compile(r"epoch 1/\d+\s+step 1/")
# the demo's tiny model at a small size: the rows time start-up, not training
TINY = [
    "model.arch=tiny",
    "model.weights=none",
    "model.min_size=128",
    "model.max_size=160",
    "train.epochs=1",
    "train.log_every=1",
    "train.progress=lines",
    "tracking.system_metrics_s=0",
    "data.num_workers=0",
]


def child_env(home: Path) -> dict[str, str]:
    """Ray, MLflow and Prefect state of the measured commands in `home`, Ray on loopback with token auth."""
    env = dict(os.environ)
    env.update(
        {
            "HOME": str(home),
            "RAY_AUTH_MODE": "token",
            "PREFECT_HOME": str(home / ".prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONPATH": str(ROOT),
            "RAY_DEDUP_LOGS": "0",  # each trial's first step line, not one folded into "repeated 2x"
        }
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def measure(command: list[str], env: dict[str, str], until: re.Pattern | None = None, count: int = 1) -> dict:
    """Run `command`: seconds (to its end, or to the `count`-th output line matching `until`, when it is then
    stopped as Ctrl-C stops it), peak RSS of its largest process in GiB, exit code and the last output."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    reached: list[float] = []
    hit = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip())
            if until is not None and until.search(line):
                reached.append(time.perf_counter() - started)
                if len(reached) >= count:
                    hit.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped_at = None
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if hit.is_set() and stopped_at is None:
            os.killpg(process.pid, signal.SIGINT)
            stopped_at = time.perf_counter()
        elif stopped_at is not None and time.perf_counter() - stopped_at > 120:
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    ended = time.perf_counter() - started
    reader.join(10)
    seconds = reached[count - 1] if hit.is_set() else ended
    tail = "\n".join(lines[-15:])
    return {"s": seconds, "gib": usage.ru_maxrss / 2**20, "rc": process.returncode, "tail": tail, "reached": reached}


def python_child(code: str, env: dict[str, str]) -> dict:
    """A Python snippet in a fresh process that prints one JSON object (its own figures) as its last line."""
    run = measure([sys.executable, "-c", code], env)
    if run["rc"] != 0:
        raise RuntimeError(f"child failed ({run['rc']}):\n{run['tail']}")
    figures = json.loads(run["tail"].splitlines()[-1])
    figures.setdefault("gib", run["gib"])
    return figures


def pycocotools_floor(files: list[Path], env: dict[str, str]) -> dict:
    code = f"""
import contextlib, io, json, time
from pycocotools.coco import COCO
started = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    for f in {[str(f) for f in files]!r}:
        COCO(f)
print(json.dumps({{"s": time.perf_counter() - started}}))
"""
    return python_child(code, env)


def faster_eval_floor(gt: Path, results: Path, env: dict[str, str]) -> dict:
    """faster-coco-eval alone: read both files (orjson, the fastest reader there is), drop the boxes (loadRes takes a
    result's box area for its size range when it has one), index, evaluate, accumulate, summarise."""
    code = f"""
import json, time
started = time.perf_counter()
import orjson
from faster_coco_eval import COCO, COCOeval_faster
gt = COCO(orjson.loads(open({str(gt)!r}, "rb").read()))
results = orjson.loads(open({str(results)!r}, "rb").read())
for result in results:
    del result["bbox"]
evaluator = COCOeval_faster(gt, gt.loadRes(results), iouType="segm", print_function=lambda *_: None)
evaluator.evaluate(); evaluator.accumulate(); evaluator.summarize()
print(json.dumps({{"s": time.perf_counter() - started, "stats": list(map(float, evaluator.stats[:12]))}}))
"""
    return python_child(code, env)


def index_build(root: Path, env: dict[str, str]) -> dict:
    code = f"""
import json, time
from instseg.data.index import ensure_index
started = time.perf_counter()
build = ensure_index({str(root)!r}, {TRAIN!r})
print(json.dumps({{"s": time.perf_counter() - started, "folder": str(build.folder), "built": build.built}}))
"""
    return python_child(code, env)


def dataset_init(root: Path, folder: str | None, env: dict[str, str]) -> dict:
    code = f"""
import json, time
from instseg.data.coco import CocoInstanceDataset
started = time.perf_counter()
dataset = CocoInstanceDataset({str(root)!r}, {TRAIN!r}, index={folder!r})
seconds = time.perf_counter() - started
dataset[0]
print(json.dumps({{"s": seconds, "images": len(dataset)}}))
"""
    return python_child(code, env)


def loader_uss(root: Path, folder: str, workers: int, env: dict[str, str]) -> dict:
    """USS of each loader worker after an epoch of reads of the annotation index (every image's annotations, every
    mask crop decoded), beside workers of the same loader that read nothing."""
    code = f"""
import gc, json, os, time
import psutil, torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from instseg.data.coco import CocoInstanceDataset

class Reads(torch.utils.data.Dataset):
    def __init__(self, dataset, touch):
        self.dataset, self.touch = dataset, touch
    def __len__(self):
        return len(self.dataset)
    def __getitem__(self, index):
        if not self.touch:
            return os.getpid(), 0
        row = int(self.dataset._rows[index])
        chosen = self.dataset._instances(row)
        boxes, labels = self.dataset.index.bbox[chosen], self.dataset._labels[chosen]
        pixels = sum(int(mask_utils.decode(self.dataset.index.crop_rle(at)[0]).sum()) for at in chosen.tolist())
        self.dataset.index.file_name(row)
        return os.getpid(), pixels + len(boxes) + len(labels)

def uss_after_epoch(dataset, touch):
    loader = DataLoader(Reads(dataset, touch), batch_size=64, num_workers={workers}, persistent_workers=True,
                        collate_fn=lambda batch: batch, worker_init_fn=lambda _: gc.collect())
    pids = set()
    for batch in loader:
        pids.update(pid for pid, _ in batch)
    time.sleep(0.5)
    sizes = [psutil.Process(pid).memory_full_info().uss / 2**20 for pid in sorted(pids)]
    del loader
    return sizes

dataset = CocoInstanceDataset({str(root)!r}, {TRAIN!r}, index={folder!r})
gc.collect()
idle = uss_after_epoch(dataset, False)
read = uss_after_epoch(dataset, True)
parent = psutil.Process().memory_full_info()
print(json.dumps({{"read": read, "idle": idle, "parent_uss": parent.uss / 2**20, "parent_rss": parent.rss / 2**20}}))
"""
    return python_child(code, env)


def instseg_command(args: list[str], env: dict[str, str], **kwargs: Any) -> dict:
    run = measure([*INSTSEG, *args], env, **kwargs)
    if run["rc"] not in (0, 1, 130, -2) and not run["reached"]:
        raise RuntimeError(f"instseg {' '.join(args)} failed ({run['rc']}):\n{run['tail']}")
    return run


def train_overrides(root: Path, work: Path, train: str, val: str) -> list[str]:
    return [
        *TINY,
        f"data.root={root}",
        f"data.train_split={train}",
        f"data.val_split={val}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"ray.storage_path={work / 'ray_results'}",
    ]


def study_overrides() -> list[str]:
    return ["tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.scheduler=none", "tune.search=random"]


def row(name: str, ours: dict, floor: dict, unit: str = "s", note: str = "") -> str:
    ratio = ours[unit] / floor[unit] if floor.get(unit) else float("nan")
    memory = f"{ours.get('gib', float('nan')):>7.2f} {floor.get('gib', float('nan')):>7.2f}"
    line = f"{name:<22}{ours[unit]:>9.1f} {floor[unit]:>9.1f} {ratio:>7.2f}x {memory}"
    return f"{line}  {note}" if note else line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of COCO 2017's counts (0.1: a quick run)")
    parser.add_argument("--data", type=Path, default=None, help="the generated dataset (made there if missing)")
    parser.add_argument("--shared", type=Path, default=None, help="the shared folder (real JPEGs from coco128-seg)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers in the USS row")
    parser.add_argument("--only", default=None, help="comma-separated rows: index,init,loader,check,split,convert,"
                        "metrics,train,study")  # fmt: skip
    args = parser.parse_args()
    from scale_data import generate

    from instseg.metrics.names import COCO_STAT_NAMES

    only = set(args.only.split(",")) if args.only else None
    wanted = lambda key: only is None or key in only  # noqa: E731
    root = args.data or Path(tempfile.gettempdir()) / f"instseg-scale-{args.scale}"
    started = time.perf_counter()
    results = generate(root, args.scale, args.shared)
    print(f"data: {root} ({time.perf_counter() - started:.0f} s to make or find)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="instseg-scale-work-"))
    env = child_env(work / "home")
    (work / "home").mkdir()
    lines = [f"{'step':<22}{'ours':>9} {'floor':>9} {'ratio':>8} {'GiB':>7} {'floor':>7}"]

    def show(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    try:
        floor = pycocotools_floor([root / "annotations" / f"instances_{TRAIN}.json"], env)
        print(f"floor: pycocotools loads and indexes {TRAIN} in {floor['s']:.1f} s, {floor['gib']:.2f} GiB", flush=True)
        folder = None
        if wanted("index") or wanted("init") or wanted("loader"):
            shutil.rmtree(root / ".instseg-index", ignore_errors=True)
            built = index_build(root, env)
            folder = built["folder"]
            show(row("index build", built, floor, note=f"-> {folder}"))
        if wanted("init") and folder:
            show(row("dataset init", dataset_init(root, folder, env), floor, note="index folder handed over"))
            show(row("dataset find", dataset_init(root, None, env), floor, note="fingerprint, index found"))
        if wanted("loader") and folder:
            uss = loader_uss(root, folder, args.workers, env)
            grown = [a - b for a, b in zip(sorted(uss["read"]), sorted(uss["idle"]))]
            show(
                f"{'loader USS (MiB)':<22}{max(uss['read']):>9.0f} {max(uss['idle']):>9.0f}   per worker after an "
                f"epoch of reads vs read nothing ({args.workers} workers; most grown by {max(grown):.0f} MiB); "
                f"parent USS {uss['parent_uss']:.0f} MiB"
            )
        both = [root / "annotations" / f"instances_{s}.json" for s in (TRAIN, VAL)]
        if wanted("check"):
            check_floor = pycocotools_floor(both, env)
            show(row("data check", instseg_command(["data", "check", str(root)], env), check_floor))
        if wanted("split"):
            split_root = work / "split"
            (split_root / "annotations").mkdir(parents=True)
            os.link(both[0], split_root / "annotations" / f"instances_{TRAIN}.json")
            (split_root / "images").mkdir()
            os.symlink(root / "images" / TRAIN, split_root / "images" / TRAIN)
            show(row("data split", instseg_command(["data", "split", str(split_root), "--val", "0.05"], env), floor))
            shutil.rmtree(split_root)
        if wanted("convert"):
            target = work / "converted"
            run = instseg_command(["data", "convert", str(root), str(target)], env)
            show(row("data convert", run, pycocotools_floor(both, env), note="COCO -> COCO, images hard-linked"))
            shutil.rmtree(target, ignore_errors=True)
        if wanted("metrics"):
            reference = faster_eval_floor(both[1], results, env)
            run = instseg_command(["metrics", str(both[1]), str(results), "--out", str(work / "metrics")], env)
            ours = json.loads((work / "metrics" / "metrics.json").read_text())
            stats = [ours[f"segm_{name}"] for name in COCO_STAT_NAMES]
            worst = max(abs(a - b) for a, b in zip(stats, reference["stats"]))
            show(row("metrics", run, reference, note=f"faster-coco-eval alone; 12 stats differ by <= {worst:.1e}"))
        if wanted("train") or wanted("study"):
            # "with the index built": both splits' indexes exist before the commands start (the demo's are built
            # by its first run, so each side's first command pays for its own small validation index)
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"from instseg.data.index import ensure_index; ensure_index({str(root)!r}, {VAL!r})",
                ],
                env=env,
                check=True,
            )
            demo = work / "demo"
            subprocess.run([*INSTSEG, "data", "synth", str(demo), "--images", "256"], env=env, check=True,
                           capture_output=True)  # fmt: skip
        if wanted("train"):
            config = ["--config", str(ROOT / "configs" / "demo.yaml")]
            scale_args = ["train", *config, *train_overrides(root, work / "t1", TRAIN, VAL)]
            demo_args = ["train", *config, *train_overrides(demo, work / "t2", "train", "val")]
            ours = instseg_command(scale_args, env, until=FIRST_STEP)
            reference = instseg_command(demo_args, env, until=FIRST_STEP)
            show(row("train first step", ours, reference, note="the same command on the demo data"))
        if wanted("study"):
            config = ["--config", str(ROOT / "configs" / "demo.yaml")]
            scale_args = ["tune", *config, *train_overrides(root, work / "s1", TRAIN, VAL), *study_overrides()]
            demo_args = ["tune", *config, *train_overrides(demo, work / "s2", "train", "val"), *study_overrides()]
            ours = instseg_command(scale_args, env, until=FIRST_STEP, count=2)
            reference = instseg_command(demo_args, env, until=FIRST_STEP, count=2)
            note = f"each trial's first step at {', '.join(f'{s:.0f}' for s in ours['reached'])} s vs " + ", ".join(
                f"{s:.0f}" for s in reference["reached"]
            )
            show(row("study first steps", ours, reference, note=note + " (demo data)"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(["", f"scale {args.scale}: {root}", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
