"""Work spread over the machine's cores: a function mapped over chunks in worker processes, results in order.

Chunks travel to the workers pickled (a few MB each, a bounded number in flight), not through memory shared by
fork: a forked worker that reads the parent's parsed JSON would copy every page it touches (reference counts),
gigabytes at COCO size.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterable, TypeVar

Result = TypeVar("Result")
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: keeps it busy without pickling the whole input at once


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or a Ray worker's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def map_chunks(
    fn: Callable[..., Result],
    chunks: Iterable[tuple[Any, ...]],
    workers: int,
    done: Callable[[int], None] | None = None,
) -> list[Result]:
    """[fn(*chunk) for chunk in chunks] with `workers` processes (1: in this process); `done(i)` after chunk i.
    `fn` must be a module-level function; the processes are forked (no re-import of the caller's __main__)."""
    if workers <= 1:
        results = []
        for index, chunk in enumerate(chunks):
            results.append(fn(*chunk))
            if done is not None:
                done(index)
        return results
    results: list[Result] = []
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        try:
            for chunk in chunks:
                pending.append(pool.submit(fn, *chunk))
                while len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    results.append(pending.popleft().result())
                    if done is not None:
                        done(len(results) - 1)
            while pending:
                results.append(pending.popleft().result())
                if done is not None:
                    done(len(results) - 1)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results
