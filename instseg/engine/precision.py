"""Mixed precision and the other speed knobs of TrainConfig, resolved once per device.

Everything here is off or harmless on CPU: bf16 autocast runs on CPU too, fp16 needs CUDA (a CPU
run falls back to fp32 and says so), the GradScaler exists only for fp16 on CUDA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """How forward passes run (autocast dtype, None = fp32) and the fp16 loss scaler, if any."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler_state(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_scaler_state(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def resolve_precision(mode: str, device: torch.device, warn=print) -> Precision:
    """train.amp for `device`: off | bf16 | fp16 (fp16 only on CUDA, with a GradScaler)."""
    if mode == "off":
        return Precision(device.type)
    if mode == "fp16" and device.type != "cuda":
        warn(f"train.amp=fp16 needs a CUDA device; running in fp32 on {device.type}")
        return Precision(device.type)
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warn("train.amp=bf16: this GPU has no bf16 support; running in fp32 (try train.amp=fp16)")
        return Precision(device.type)
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return Precision(device.type, _DTYPES[mode], scaler)


def apply_backend_flags() -> None:
    """cuDNN's autotuner stays off: Mask R-CNN's RoI heads change shape every step, so it would tune again
    every step (config.CUDNN_BENCHMARK_REFUSAL has the measurement). Set here because a library the job
    imported may have turned it on."""
    torch.backends.cudnn.benchmark = False
