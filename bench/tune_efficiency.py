"""What early stopping saves: the same study (search space, random-search seed, number of trials) run with no
scheduler (FIFO), ASHA, HyperBand and the median stopping rule, on the synthetic data with the tiny model.

Reported per scheduler: trials, trial-epochs spent, wall time, the best fitness reached, and the trial-epochs
(in the order they were reported) it took to reach FIFO's best fitness, and 95% of it; goal: ASHA at most 1/3
of FIFO's trial-epochs. Random search makes every study try the same settings, so the schedulers differ only
in what they stop.

And a trial's fixed cost, the seconds between its MLflow run's creation and its first epoch's report that are
not training or validation, split into: start (the trial's driver, Ray Train's controller and worker group,
until the worker's loop runs), setup (data, model, run parameters, in the worker), and report (epoch 1's
report, checkpoint and logging, until its fitness is in MLflow); goal: at most 5 s beyond training and
validation.

    .venv/bin/python bench/tune_efficiency.py [--trials 12] [--epochs 8] [--images 96] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = [
    "model.arch=tiny",
    "model.weights=none",
    "model.min_size=128",
    "model.max_size=160",
    "data.batch_size=4",
    "train.warmup_iters=2",
    "model.box_score_thresh=0.0",
    "model.box_detections_per_img=30",
]
SCHEDULERS = {"fifo": "none", "asha": "asha", "hyperband": "hyperband", "median": "median"}


def run_study(name: str, scheduler: str, args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    from instseg.config import load, resolve_paths
    from tuning.tune import run_tuning

    overrides = [
        *TINY,
        f"data.root={data}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.experiment={name}",
        f"ray.storage_path={work / 'ray_results'}",
        f"train.epochs={args.epochs}",
        "train.progress=lines",
        "train.plot_every=0",
        "tracking.system_metrics_s=0",
        f"tune.num_samples={args.trials}",
        f"tune.max_concurrent_trials={args.concurrency}",
        "tune.search=random",
        f"tune.seed={args.seed}",
        f"tune.scheduler={scheduler}",
        "tune.grace_period=1",
        f"tune.reduction_factor={args.reduction_factor}",
        "tune.min_samples_required=3",
        f"run_name={name}",
    ]
    cfg = resolve_paths(load(ROOT / "configs" / "demo.yaml", overrides))
    started = time.perf_counter()
    summary = run_tuning(cfg)
    wall = time.perf_counter() - started
    return {"summary": summary, "wall_s": wall, "store": cfg.tracking.uri}


def trial_points(store: str, summary: Any) -> tuple[list[tuple[float, float]], list[dict[str, float]]]:
    """Every (timestamp, fitness) the study's trials reported, in time order, and each trial's overhead parts."""
    from mlflow import MlflowClient

    from instseg.metrics.names import EPOCH_TIME, FITNESS, SETUP_TIME

    client = MlflowClient(store)
    points, overheads = [], []
    for trial in summary.trials:
        if trial.run_id is None:
            continue
        history = sorted(client.get_metric_history(trial.run_id, FITNESS), key=lambda m: m.step)
        points.extend((m.timestamp / 1000, m.value) for m in history)
        setup = [m for m in client.get_metric_history(trial.run_id, SETUP_TIME) if m.step == 0]
        epoch_time = {m.step: m.value for m in client.get_metric_history(trial.run_id, EPOCH_TIME)}
        if not history or not setup or 1 not in epoch_time:
            continue
        created = client.get_run(trial.run_id).info.start_time / 1000
        setup_end = setup[0].timestamp / 1000
        loop_entry = setup_end - setup[0].value
        first_report = history[0].timestamp / 1000
        overheads.append(
            {
                "start": loop_entry - created,
                "setup": setup[0].value,
                "epoch": epoch_time[1],
                "report": first_report - setup_end - epoch_time[1],
                "total": first_report - created - epoch_time[1],
            }
        )
    return sorted(points), overheads


def epochs_to_reach(points: list[tuple[float, float]], target: float) -> int | None:
    """Trial-epochs reported (in time order) until one reached `target`; None if none did."""
    for count, (_, value) in enumerate(points, start=1):
        if value >= target:
            return count
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--images", type=int, default=96, help="synthetic images (train + val)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    names = ",".join(SCHEDULERS)
    parser.add_argument("--schedulers", default=names, help=f"comma-separated, from {names}")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from instseg.data.synth import synthesize

    results = {}
    with tempfile.TemporaryDirectory(prefix="instseg-tune-bench-") as tmp:
        work = Path(tmp)
        synthesize(work / "synth", images=args.images, seed=1)
        for label in args.schedulers.split(","):
            study = run_study(f"bench-{label}", SCHEDULERS[label], args, work / "synth", work)
            points, overheads = trial_points(study["store"], study["summary"])
            results[label] = {
                "wall_s": study["wall_s"],
                "points": points,
                "overheads": overheads,
                "trials": len(study["summary"].trials),
            }
            print(f"{label}: {len(points)} trial-epochs in {study['wall_s']:.0f} s", flush=True)

    fifo_best = max(v for _, v in results["fifo"]["points"]) if "fifo" in results else None
    print(
        f"\nsame {args.trials} random-search settings (seed {args.seed}), {args.epochs} epochs each, "
        f"{args.concurrency} trials at a time, reduction factor {args.reduction_factor}"
    )
    header = f"{'scheduler':<10}{'trials':>7}{'trial-epochs':>14}{'wall s':>8}{'best':>9}"
    header += f"{'to FIFO best':>14}{'to 95%':>8}{'epochs vs FIFO':>16}"
    print(header)
    fifo_to_best = epochs_to_reach(results["fifo"]["points"], fifo_best) if fifo_best is not None else None
    for label, result in results.items():
        points = result["points"]
        best = max(v for _, v in points)
        reach = epochs_to_reach(points, fifo_best) if fifo_best is not None else None
        near = epochs_to_reach(points, 0.95 * fifo_best) if fifo_best is not None else None
        ratio = f"{len(points) / len(results['fifo']['points']):.2f}" if "fifo" in results else "-"
        print(
            f"{label:<10}{result['trials']:>7}{len(points):>14}{result['wall_s']:>8.0f}{best:>9.4f}"
            f"{reach if reach is not None else 'never':>14}{near if near is not None else 'never':>8}{ratio:>16}"
        )
    if fifo_to_best is not None:
        print(f"(FIFO reached its own best after {fifo_to_best} trial-epochs)")

    print("\nper-trial fixed cost, median seconds (run created -> epoch 1 in MLflow, minus epoch 1's train + val)")
    print(f"{'scheduler':<10}{'start':>8}{'setup':>8}{'report':>8}{'overhead':>10}{'epoch 1':>9}")
    for label, result in results.items():
        parts = result["overheads"]
        if not parts:
            continue
        median = {key: statistics.median(p[key] for p in parts) for key in parts[0]}
        print(
            f"{label:<10}{median['start']:>8.1f}{median['setup']:>8.1f}{median['report']:>8.1f}"
            f"{median['total']:>10.1f}{median['epoch']:>9.1f}"
        )
    print("goal: ASHA's trial-epochs <= 1/3 of FIFO's; overhead <= 5 s")


if __name__ == "__main__":
    main()
