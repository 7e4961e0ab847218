"""How the tracking store holds up when many trials log at once: sqlite (a file every process writes itself, the
default) vs PostgreSQL behind `instseg tracking serve` (a throwaway cluster on 127.0.0.1, as in the tests).

N writer processes (default 4, 16, 32) each own one run and log M epochs the way the Train controller does
(ray_jobs.epoch_logger: one batch of `--metrics` values per epoch, RunLogger.log_metrics, no retries of ours),
all starting together: one batch every `--epoch-s` seconds (an epoch's length; each writer at its own phase, as
trials started at different times are), or with `--epoch-s 0` back to back (a burst no real study makes).
Reported per store and N: per-call latency p50 / p95 / p99, calls and points per second, failed calls (with the
first error), and, read back afterwards, points lost and points duplicated (every key of every run must have
steps 1..M exactly once). Goal: 32 writers on PostgreSQL lose and duplicate nothing, p95
under 200 ms.

    .venv/bin/python bench/tracking_load.py [--writers 4,16,32] [--epochs 20] [--metrics 40] [--epoch-s 1]
                                            [--stores sqlite,postgresql] [--server-workers 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "load"


def writer(uri: str, run_id: str, epochs: int, metrics: int, epoch_s: float, ready: Any, start: Any, out: Any) -> None:
    """One trial's controller: M batches, each timed; errors counted, not retried."""
    from instseg.errors import first_line
    from instseg.tracking.runs import RunLogger

    logger = RunLogger(uri, run_id)
    latencies, errors = [], []
    logger.client.get_run(run_id)  # connections and the server's first-request work happen before the start
    ready.put(run_id)
    start.wait()
    began_at = time.monotonic() + random.Random(run_id).uniform(0, epoch_s)
    for epoch in range(1, epochs + 1):
        time.sleep(max(0.0, began_at + (epoch - 1) * epoch_s - time.monotonic()))
        values = {f"val/metric_{index:02d}": epoch + index / 100 for index in range(metrics)}
        began = time.perf_counter()
        try:
            logger.log_metrics(values, step=epoch)
        except Exception as exc:  # noqa: BLE001 (what a store raises under load is the measurement)
            errors.append(first_line(exc, 200))
        latencies.append(time.perf_counter() - began)
    out.put((run_id, latencies, errors))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def load_test(uri: str, writers: int, epochs: int, metrics: int, epoch_s: float) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run_ids = [client.create_run(experiment_id, run_name=f"w{writers}-{i}").info.run_id for i in range(writers)]
    context = multiprocessing.get_context("spawn")
    ready, start, out = context.Queue(), context.Event(), context.Queue()
    processes = [
        context.Process(target=writer, args=(uri, run_id, epochs, metrics, epoch_s, ready, start, out))
        for run_id in run_ids
    ]
    for process in processes:
        process.start()
    for _ in processes:  # every writer imported MLflow, reached the store and waits at the start line
        ready.get(timeout=600)
    began = time.perf_counter()
    start.set()
    results = [out.get(timeout=1800) for _ in processes]
    wall = time.perf_counter() - began
    for process in processes:
        process.join()
    latencies = [latency for _, run_latencies, _ in results for latency in run_latencies]
    errors = [error for _, _, run_errors in results for error in run_errors]
    lost = duplicated = 0
    for run_id in run_ids:
        for index in range(metrics):
            steps = [m.step for m in client.get_metric_history(run_id, f"val/metric_{index:02d}")]
            lost += len(set(range(1, epochs + 1)) - set(steps))
            duplicated += len(steps) - len(set(steps))
    return {
        "calls": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
        "p99": percentile(latencies, 0.99),
        "calls_s": len(latencies) / wall,
        "points_s": len(latencies) * metrics / wall,
        "lost": lost,
        "duplicated": duplicated,
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", default="4,16,32", help="comma-separated writer counts")
    parser.add_argument("--epochs", type=int, default=20, help="batches per writer")
    parser.add_argument("--metrics", type=int, default=40, help="values per batch")
    parser.add_argument("--epoch-s", type=float, default=1.0, help="seconds between a writer's batches (0: a burst)")
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--server-workers", type=int, default=4, help="`instseg tracking serve --workers`")
    args = parser.parse_args()
    counts = [int(n) for n in args.writers.split(",")]

    from tests.servers import PostgresCluster, TrackingServer, postgres_unavailable

    rows = []
    with tempfile.TemporaryDirectory(prefix="instseg-load-") as tmp:
        for store in args.stores.split(","):
            for count in counts:
                folder = Path(tmp, f"{store}-{count}")
                folder.mkdir()
                if store == "sqlite":
                    rows.append(
                        (
                            store,
                            count,
                            load_test(
                                f"sqlite:///{folder / 'mlflow.db'}", count, args.epochs, args.metrics, args.epoch_s
                            ),
                        )
                    )
                    continue
                if postgres_unavailable():
                    print(f"postgresql skipped: {postgres_unavailable()}", file=sys.stderr)
                    break
                cluster = PostgresCluster().start()
                server = None
                try:
                    backend = cluster.create_database("load")
                    server = TrackingServer(backend, folder / "artifacts", workers=args.server_workers).wait_ready()
                    rows.append((store, count, load_test(server.url, count, args.epochs, args.metrics, args.epoch_s)))
                finally:
                    if server is not None:
                        server.stop()
                    cluster.stop()
                print(f"{store} x{count} done", file=sys.stderr, flush=True)

    pace = f"one every {args.epoch_s:g} s" if args.epoch_s else "back to back"
    print(f"{args.epochs} batches of {args.metrics} metrics per writer, {pace}")
    print(
        f"{'store':<11}{'writers':>8}{'calls':>7}{'failed':>7}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
        f"{'calls/s':>9}{'points/s':>10}{'lost':>6}{'dup':>5}  first error"
    )
    for store, count, r in rows:
        print(
            f"{store:<11}{count:>8}{r['calls']:>7}{r['errors']:>7}{r['p50'] * 1000:>8.0f}{r['p95'] * 1000:>8.0f}"
            f"{r['p99'] * 1000:>8.0f}{r['calls_s']:>9.1f}{r['points_s']:>10.0f}{r['lost']:>6}{r['duplicated']:>5}"
            f"  {r['first_error'][:80]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
