"""Early stopping on FITNESS: stop after `patience` epochs without an improvement larger than `min_delta`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from instseg.metrics.names import FITNESS, FITNESS_MODE


@dataclass
class EarlyStopping:
    patience: int  # 0 turns early stopping off
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_epoch: int | None = None

    def step(self, value: float, epoch: int) -> bool:
        """Record the fitness of `epoch` (1-based); True when training should stop now."""
        sign = 1.0 if FITNESS_MODE == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return False
        self.bad_epochs += 1
        if self.patience > 0 and self.bad_epochs >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    @property
    def reason(self) -> str:
        return (
            f"{FITNESS} did not improve by more than {self.min_delta} for {self.bad_epochs} epochs "
            f"(best {self.best:.5f} at epoch {self.best_epoch}); stopped after epoch {self.stopped_epoch}"
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
