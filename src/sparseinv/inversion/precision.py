"""Which arithmetic inversion runs the model in: fp32, or bf16 autocast where it pays.

Only the model's forward and backward run under bf16 autocast; the pixels, Adam's state
and the loss stay fp32. ``auto`` chooses bf16 where the device computes it natively:
a CUDA device that supports bf16, or a CPU whose bf16 matrix product measures faster
than fp32 in a short probe (run once per process and device). Nothing is assumed from
the CPU's name: instruction sets differ machine to machine.

Under bf16 a second probe decides how the model's attention runs. On the CPU measured
here torch's fused bf16 attention had a slow backward (a 46-token DeiT-Tiny step: 272 ms
fused, 163 ms with timm's explicit attention, 242 ms in fp32; benchmarks/
sparse_step_profile.py), so where the explicit attention measures faster, timm's
``fused_attn`` switch is turned off for the run and restored after it.

Both probes time the machine. Where a choice must not depend on timing (tests, or a
machine measured once), inject it: ``resolve_precision(asked, device, Probes.fixed(...))``,
or ``with use_probes(Probes.fixed(...)):`` around code that resolves the precision itself
(``invert``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparseinv.errors import UsageError
from sparseinv.inversion.config import PRECISIONS

# bf16 must beat fp32 by this factor in the probe before ``auto`` picks it.
PROBE_MARGIN = 1.2
PROBE_SIZE = 1024
_probe_cache: dict[str, float] = {}
# (batch, heads, tokens, head width) of the attention probe: DeiT-Tiny's shape, a few images.
ATTENTION_PROBE_SHAPE = (8, 3, 197, 64)
_attention_cache: dict[str, float] = {}


@dataclass(frozen=True)
class Precision:
    """What a run uses and why (recorded in ``run.json``)."""

    asked: str
    used: str
    why: str
    fused_attention: bool = True
    attention_why: str = "the model's own setting"

    def autocast(self, device: torch.device):
        """A context running the model in bf16 autocast, or doing nothing for fp32."""
        if self.used != "bf16":
            return contextlib.nullcontext()
        # No cast cache: it only ever held weights that train (inversion's are frozen), and a
        # cache that outlives a captured CUDA graph's step would be read from the wrong memory.
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)

    @contextlib.contextmanager
    def attention(self, model: nn.Module):
        """While inside, the model's attention runs explicitly where the probe found that faster."""
        switched = [] if self.fused_attention else [m for m in model.modules() if getattr(m, "fused_attn", False)]
        for module in switched:
            module.fused_attn = False
        try:
            yield
        finally:
            for module in switched:
                module.fused_attn = True

    def record(self) -> dict:
        attention = "as the model sets it" if self.fused_attention else "explicit"
        return {"asked": self.asked, "used": self.used, "why": self.why, "attention": attention, "attention_why": self.attention_why}


def wall_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Wall time of ``repeats`` calls of ``fn`` on ``device``, after ``warmup`` untimed ones."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return time.perf_counter() - start


Timer = Callable[[Callable[[], object], torch.device, int, int], float]


def bf16_speedup(device: torch.device, timer: Timer | None = None) -> float:
    """fp32 time over bf16 time of a square matrix product on ``device`` (cached per process).

    ``timer(fn, device, warmup, repeats)`` times the calls (default :func:`wall_seconds`).
    """
    timer = timer or wall_seconds
    key = str(device)
    if key not in _probe_cache:
        a = torch.randn(PROBE_SIZE, PROBE_SIZE, device=device)
        b = a.bfloat16()
        fp32 = timer(lambda: a @ a, device, 2, 5)
        _probe_cache[key] = fp32 / max(timer(lambda: b @ b, device, 2, 5), 1e-9)
    return _probe_cache[key]


def fused_attention_slowdown(device: torch.device, timer: Timer | None = None) -> float:
    """Time of torch's fused bf16 attention, forward and backward, over timm's explicit one (cached per process)."""
    timer = timer or wall_seconds
    key = str(device)
    if key not in _attention_cache:
        q, k, v = (torch.randn(ATTENTION_PROBE_SHAPE, device=device, requires_grad=True) for _ in range(3))

        def fused():
            return F.scaled_dot_product_attention(q, k, v)

        def explicit():  # what timm's Attention computes with fused_attn off
            return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v

        def step(attend) -> Callable[[], None]:
            return lambda: attend().float().sum().backward()

        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            fused_time = timer(step(fused), device, 2, 3)
            explicit_time = timer(step(explicit), device, 2, 3)
        _attention_cache[key] = fused_time / max(explicit_time, 1e-9)
    return _attention_cache[key]


@dataclass(frozen=True)
class Probes:
    """What the precision choice goes by on a device: two ratios, measured or given.

    Attributes:
        bf16_speedup: ``device -> fp32 time / bf16 time`` of a matrix product; ``auto`` on a
            CPU picks bf16 from :data:`PROBE_MARGIN` up.
        fused_attention_slowdown: ``device -> fused bf16 attention time / explicit``; under
            bf16, attention runs explicitly from :data:`PROBE_MARGIN` up.
    """

    bf16_speedup: Callable[[torch.device], float]
    fused_attention_slowdown: Callable[[torch.device], float]

    @classmethod
    def measured(cls) -> "Probes":
        """The timing probes of this module (looked up when called, so a replaced one is used)."""
        return cls(lambda device: bf16_speedup(device), lambda device: fused_attention_slowdown(device))

    @classmethod
    def fixed(cls, bf16_speedup: float, fused_attention_slowdown: float = 1.0) -> "Probes":
        """Given ratios, whatever the device: the choice without timing anything."""
        return cls(lambda device: bf16_speedup, lambda device: fused_attention_slowdown)


_installed: list[Probes] = []


@contextlib.contextmanager
def use_probes(probes: Probes):
    """Inside the ``with``, every precision resolved without explicit probes uses ``probes``."""
    _installed.append(probes)
    try:
        yield probes
    finally:
        _installed.pop()


def current_probes() -> Probes:
    """The innermost :func:`use_probes`, else the timing probes."""
    return _installed[-1] if _installed else Probes.measured()


def _with_attention(chosen: Precision, device: torch.device, probes: Probes | None = None) -> Precision:
    """``chosen``, with the attention the probe finds faster under bf16 (fp32 keeps the model's own)."""
    if chosen.used != "bf16":
        return chosen
    slowdown = (probes or current_probes()).fused_attention_slowdown(device)
    if slowdown >= PROBE_MARGIN:
        why = f"fused bf16 attention {slowdown:.1f}x slower than explicit on this device"
        return Precision(chosen.asked, chosen.used, chosen.why, False, why)
    return Precision(chosen.asked, chosen.used, chosen.why, True, f"fused bf16 attention {slowdown:.2f}x the time of explicit")


def resolve_precision(asked: str, device: torch.device, probes: Probes | None = None) -> Precision:
    """What the run will use on ``device`` for ``fp32``/``bf16``/``auto``, and how its attention runs.

    Args:
        asked: ``fp32``, ``bf16`` or ``auto``.
        device: Where the model runs.
        probes: What the choice goes by; ``None``: :func:`current_probes` (timing, unless
            :func:`use_probes` gave others).

    Raises:
        UsageError: an unknown precision, or bf16 on a CUDA device without it.
    """
    return _with_attention(_resolve_dtype(asked, device, probes), device, probes)


def _resolve_dtype(asked: str, device: torch.device, probes: Probes | None = None) -> Precision:
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
    speedup = (probes or current_probes()).bf16_speedup(device)
    if speedup >= PROBE_MARGIN:
        return Precision(asked, "bf16", f"bf16 matrix product {speedup:.1f}x faster than fp32 on this CPU")
    return Precision(asked, "fp32", f"bf16 matrix product only {speedup:.2f}x the speed of fp32 on this CPU")
