"""What rank 0 shows while it trains: a live bar or plain lines during an epoch, then one table row per epoch.

train_one_epoch calls a Progress once per step (no host sync: the running loss is passed only on the steps
where the loop reads it anyway, every train.log_every steps). A bar suits a terminal; a log file, `ray job
logs` or a CI log wants plain lines, one per train.log_every steps.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

Write = Callable[[str], None]


class Progress(Protocol):
    def start(self, steps: int | None) -> None: ...

    def step(self, step: int, images: int, loss: float | None) -> None:
        """After each step: steps and images so far this epoch, the running mean loss when it was read."""

    def close(self) -> None: ...


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class LineProgress:
    """A plain line each time the loss is read (every train.log_every steps): readable in any log."""

    def __init__(self, epoch: int, epochs: int, write: Write) -> None:
        self.label = f"epoch {epoch}/{epochs}"
        self.write = write
        self.steps: int | None = None
        self.started = time.perf_counter()

    def start(self, steps: int | None) -> None:
        self.steps, self.started = steps, time.perf_counter()

    def step(self, step: int, images: int, loss: float | None) -> None:
        if loss is None:
            return
        elapsed = time.perf_counter() - self.started
        of = f"/{self.steps}" if self.steps else ""
        eta = f"  ETA {_clock(elapsed / step * (self.steps - step))}" if self.steps else ""
        self.write(f"{self.label}  step {step}{of}  loss {loss:.4f}  {images / elapsed:.1f} img/s{eta}")

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm-style bar (tqdm's own, or ray.experimental.tqdm_ray's, which the Ray driver draws): steps, rate
    and ETA from the bar; loss and images/s in its description."""

    def __init__(self, epoch: int, epochs: int, make_bar: Callable[..., Any]) -> None:
        self.label = f"epoch {epoch}/{epochs}"
        self.make_bar = make_bar
        self.bar: Any = None
        self.started = time.perf_counter()

    def start(self, steps: int | None) -> None:
        self.started = time.perf_counter()
        self.bar = self.make_bar(total=steps, desc=self.label, unit="step")

    def step(self, step: int, images: int, loss: float | None) -> None:
        if loss is not None:
            rate = images / max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_description(f"{self.label} loss {loss:.4f} {rate:.1f} img/s")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
