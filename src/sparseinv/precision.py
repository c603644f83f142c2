"""Which arithmetic inversion runs the model in: fp32, or bf16 autocast where it pays.

Only the model's forward and backward run under bf16 autocast; the pixels, Adam's state
and the loss stay fp32. ``auto`` chooses bf16 where the device computes it natively:
a CUDA device that supports bf16, or a CPU whose bf16 matrix product measures faster
than fp32 in a short probe (run once per process and device). Nothing is assumed from
the CPU's name: instruction sets differ machine to machine.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from sparseinv.errors import UsageError

PRECISIONS = ("fp32", "bf16", "auto")
# bf16 must beat fp32 by this factor in the probe before ``auto`` picks it.
PROBE_MARGIN = 1.2
PROBE_SIZE = 1024
_probe_cache: dict[str, float] = {}


@dataclass(frozen=True)
class Precision:
    """What a run uses and why (recorded in ``run.json``)."""

    asked: str
    used: str
    why: str

    def autocast(self, device: torch.device):
        """A context running the model in bf16 autocast, or doing nothing for fp32."""
        if self.used != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def record(self) -> dict:
        return {"asked": self.asked, "used": self.used, "why": self.why}


def bf16_speedup(device: torch.device) -> float:
    """fp32 time over bf16 time of a square matrix product on ``device`` (cached per process)."""
    key = str(device)
    if key not in _probe_cache:
        a = torch.randn(PROBE_SIZE, PROBE_SIZE, device=device)

        def seconds(x: torch.Tensor) -> float:
            for _ in range(2):
                x @ x
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(5):
                x @ x
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        _probe_cache[key] = seconds(a) / max(seconds(a.bfloat16()), 1e-9)
    return _probe_cache[key]


def resolve_precision(asked: str, device: torch.device) -> Precision:
    """Turn ``fp32``/``bf16``/``auto`` into what the run will use on ``device``.

    Raises:
        UsageError: an unknown precision, or bf16 on a CUDA device without it.
    """
    if asked not in PRECISIONS:
        raise UsageError(f"unknown precision '{asked}': use one of {', '.join(PRECISIONS)}.")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if asked == "fp32":
        return Precision(asked, "fp32", "asked for fp32")
    if asked == "bf16":
        if device.type == "cuda" and not cuda_bf16:
            raise UsageError(f"--precision bf16: the CUDA device {device} does not support bf16.")
        return Precision(asked, "bf16", "asked for bf16")
    if device.type == "cuda":
        return Precision(asked, "bf16" if cuda_bf16 else "fp32", "CUDA device with bf16" if cuda_bf16 else "CUDA device without bf16")
    speedup = bf16_speedup(device)
    if speedup >= PROBE_MARGIN:
        return Precision(asked, "bf16", f"bf16 matrix product {speedup:.1f}x faster than fp32 on this CPU")
    return Precision(asked, "fp32", f"bf16 matrix product only {speedup:.2f}x the speed of fp32 on this CPU")
