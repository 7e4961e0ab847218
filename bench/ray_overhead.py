"""Ray Train overhead benchmark: the same model, data, batch and number of steps trained by a bare
PyTorch loop in this process and by our Ray Train job (ray_jobs.train on a private local Ray),
interleaved round by round.

Reported:
- throughput ratio inside the loop: training images/s of the Ray Train worker over the bare loop's,
  on the last epoch (the first one builds mask caches and warms up); goal >= 0.95;
- the fixed cost of `fit()`: its wall time minus the time spent in epochs (worker group start-up,
  dataset and model construction, per-epoch report + checkpoint, bundle logging, shutdown).

Both sides use the same torch thread count (the Ray worker gets `--threads` CPUs, and Ray sets its
OMP_NUM_THREADS from them).

    .venv/bin/python bench/ray_overhead.py [--images 96] [--epochs 3] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = [
    "model.arch=tiny",
    "model.weights=none",
    "model.min_size=128",
    "model.max_size=160",
    "data.batch_size=4",
    "train.warmup_iters=2",
]


def bare_loop(cfg, epochs: int) -> list[float]:
    """images/s per epoch of train_one_epoch in this process: no Ray, no DDP, no reports."""
    import torch

    from instseg.data.loaders import build_datasets, build_loader
    from instseg.engine.loops import train_one_epoch
    from instseg.engine.optim import build_optimizer, build_scheduler
    from instseg.metrics.names import WORKER_THROUGHPUT
    from instseg.models import build_model

    torch.manual_seed(cfg.seed)
    train_set, _ = build_datasets(cfg.data)
    model = build_model(cfg.model, train_set.label_map.num_classes)
    loader = build_loader(train_set, cfg.data, shuffle=True, seed=cfg.seed)
    optimizer = build_optimizer(model, cfg.train, lr=cfg.effective_lr())
    scheduler = build_scheduler(optimizer, cfg.train, len(loader))
    return [
        train_one_epoch(model, optimizer, loader, torch.device("cpu"), scheduler)[WORKER_THROUGHPUT]
        for _ in range(epochs)
    ]


def ray_job(cfg) -> tuple[list[float], float, float]:
    """(images/s per epoch inside the worker, fit() wall time, seconds spent in epochs)."""
    from instseg.metrics.names import WORKER_THROUGHPUT
    from instseg.tracking.runs import RunLogger
    from ray_jobs.driver_run import fit_and_log, open_train_run
    from ray_jobs.trainer import build_trainer

    name = cfg.run_name
    run_id, _ = open_train_run(cfg, name)
    trainer = build_trainer(cfg, run_id=run_id, name=name)
    started = time.perf_counter()
    fit_and_log(trainer, cfg, run_id)
    wall = time.perf_counter() - started
    run = RunLogger(cfg.tracking.uri, run_id)
    rates, epoch_times = (
        [value for _, value in sorted(run.history(key))] for key in (WORKER_THROUGHPUT, "train/epoch_time_s")
    )
    return rates, wall, sum(epoch_times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="synthetic images (3/4 train)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    import torch

    from instseg.config import load, resolve_paths
    from instseg.data.synth import synthesize

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="instseg-bench-ray-"))
    synthesize(work / "synth", images=args.images, seed=0)
    ray.init(address="local", num_cpus=args.threads, log_to_driver=False)

    def config(run: str):
        return resolve_paths(
            load(
                ROOT / "configs" / "demo.yaml",
                [
                    *TINY,
                    f"data.root={work / 'synth'}",
                    f"train.epochs={args.epochs}",
                    f"run_name={run}",
                    f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                    f"ray.storage_path={work / 'ray_results'}",
                    f"ray.cpus_per_worker={args.threads}",
                    "tracking.experiment=bench-ray-overhead",
                ],
            )
        )

    bare_rates, ray_rates, fixed_costs, walls = [], [], [], []
    for round_index in range(args.rounds):
        bare = bare_loop(config("unused"), args.epochs)
        rates, wall, in_epochs = ray_job(config(f"overhead-{round_index}"))
        bare_rates.append(bare[-1])
        ray_rates.append(rates[-1])
        walls.append(wall)
        fixed_costs.append(wall - in_epochs)
        print(
            f"round {round_index + 1}: bare {bare[-1]:.2f} img/s, Ray Train worker {rates[-1]:.2f} img/s "
            f"(ratio {rates[-1] / bare[-1]:.3f}); fit() {wall:.1f} s, of which outside epochs {wall - in_epochs:.1f} s",
            flush=True,
        )
    ray.shutdown()

    ratio = statistics.median(r / b for r, b in zip(ray_rates, bare_rates))
    print(
        f"\n{args.images * 3 // 4} training images x {args.epochs} epochs, batch 4, tiny model at 128 px, "
        f"{args.threads} threads, "
        f"median of {args.rounds} interleaved rounds (last epoch each):"
    )
    print(f"  throughput inside the loop: Ray Train / bare PyTorch = {ratio:.3f} (goal >= 0.95)")
    print(f"  bare {statistics.median(bare_rates):.2f} img/s, Ray Train {statistics.median(ray_rates):.2f} img/s")
    print(
        f"  fit() wall {statistics.median(walls):.1f} s; "
        f"fixed cost outside epochs {statistics.median(fixed_costs):.1f} s "
        f"(start-up, {args.epochs} reports + checkpoints, bundle logging, shutdown)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
