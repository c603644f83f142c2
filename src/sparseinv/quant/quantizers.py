"""Fake-quantizers: the arithmetic (torch's fake-quantize ops) and range calibrators.

Weights are symmetric per output channel; activations asymmetric, per tensor (or per
last-dim channel for post-LayerNorm inputs). Every module here has a ``mode``:

* ``"off"``: identity (full precision),
* ``"observe"``: identity, but activation quantizers record what passes through,
* ``"quant"``: fake-quantize with the calibrated scales and zero points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("off", "observe", "quant")
# Clipping candidates searched by the MSE calibrator, as fractions of the min/max
# range. Activations (softmax scores, post-GELU tails) can want heavy clipping;
# weights rarely below a third of their abs-max even at 2 bits.
ACT_MSE_GRID = torch.linspace(0.04, 1.0, 33)
WEIGHT_MSE_GRID = torch.linspace(0.3, 1.0, 36)
# Caps on the rows kept for percentile/MSE (per batch and in all), so calibration
# time and memory stay flat however many batches come.
SAMPLE_ROWS_PER_TENSOR = 1 << 14
SAMPLE_ROWS_PER_CHANNEL = 512
SAMPLE_BATCHES = 4


def weight_qrange(bits: int) -> tuple[int, int]:
    """Symmetric signed range, e.g. 4 bits -> (-7, 7): zero is exact and no side is favoured."""
    q = 2 ** (bits - 1) - 1
    return -q, q


def act_qrange(bits: int) -> tuple[int, int]:
    """Unsigned range for asymmetric activations, e.g. 8 bits -> (0, 255)."""
    return 0, 2**bits - 1


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize ``w`` symmetric per output channel (dim 0) with ``scale`` (out,)."""
    qmin, qmax = weight_qrange(bits)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, qmin, qmax)


def weight_scale(w: torch.Tensor, bits: int, calibrator: str = "minmax") -> torch.Tensor:
    """Per-output-channel scale of ``w``: its abs-max, or the MSE-best clipping of it.

    Args:
        w: (out, ...) weight.
        bits: Bit-width.
        calibrator: ``mse`` searches the clipping per channel; anything else uses min/max.
    """
    w = w.detach().float()
    _, qmax = weight_qrange(bits)
    absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-8)
    if calibrator != "mse":
        return absmax / qmax
    best_scale, best_err = absmax / qmax, None
    for alpha in WEIGHT_MSE_GRID:
        scale = (alpha * absmax / qmax).clamp_min(1e-8)
        err = (fake_quant_weight(w, scale, bits) - w).pow(2).reshape(w.shape[0], -1).sum(dim=1)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and integer zero point covering [lo, hi] (widened to include 0)."""
    _, qmax = act_qrange(bits)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero_point = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    return scale.float(), zero_point


class ActQuantizer(nn.Module):
    """Asymmetric activation fake-quantizer with its own observer.

    Args:
        bits: Bit-width.
        calibrator: ``minmax``, ``percentile`` or ``mse`` (see :class:`QuantConfig`).
        percentile: Upper percentile for the ``percentile`` calibrator.
        per_channel: One range per channel of the last dimension instead of per tensor.
    """

    def __init__(self, bits: int, calibrator: str = "minmax", percentile: float = 99.99, per_channel: bool = False) -> None:
        super().__init__()
        self.bits, self.calibrator, self.percentile, self.per_channel = bits, calibrator, percentile, per_channel
        self.mode = "off"
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.reset()

    def reset(self) -> None:
        """Forget everything observed so far."""
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(0)

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, {kind}, calibrator={self.calibrator}, mode={self.mode}"

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (rows, channels): channels are the last dim, or one for per-tensor."""
        return x.detach().reshape(-1, x.shape[-1] if self.per_channel else 1).float()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        if self.calibrator != "minmax":
            cap = SAMPLE_ROWS_PER_CHANNEL if self.per_channel else SAMPLE_ROWS_PER_TENSOR
            if rows.shape[0] > cap:
                pick = torch.randperm(rows.shape[0], generator=self._generator)[:cap]
                rows = rows[pick.to(rows.device)]
            self.samples.append(rows.cpu())

    def _sample(self) -> torch.Tensor:
        data = torch.cat(self.samples)
        cap = (SAMPLE_ROWS_PER_CHANNEL if self.per_channel else SAMPLE_ROWS_PER_TENSOR) * SAMPLE_BATCHES
        if data.shape[0] > cap:
            data = data[torch.randperm(data.shape[0], generator=self._generator)[:cap]]
        return data

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn what was observed into the scale and zero point, then drop the samples."""
        if self.min_val is None:
            raise RuntimeError("activation quantizer finalised before it observed anything")
        lo, hi = self.min_val.cpu(), self.max_val.cpu()
        if self.calibrator == "percentile":
            data = self._sample()
            q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
            lo, hi = torch.quantile(data, q, dim=0)
        elif self.calibrator == "mse":
            lo, hi = self._mse_range(self._sample(), lo, hi)
        scale, zero_point = act_qparams(lo, hi, self.bits)
        device = self.scale.device
        self.scale, self.zero_point = scale.to(device), zero_point.to(device)
        self.reset()

    def _mse_range(self, data: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip [lo, hi] (per channel) to minimise the squared quantization error on ``data``.

        The upper end is searched first with the lower end fixed, then the lower end:
        activation ranges are lopsided (post-GELU, softmax scores), so one shared
        shrink factor would clip the short side far too much.
        """
        qmin, qmax = act_qrange(self.bits)

        def error(lo_c: torch.Tensor, hi_c: torch.Tensor) -> torch.Tensor:
            scale, zero_point = act_qparams(lo_c, hi_c, self.bits)
            fq = torch.fake_quantize_per_channel_affine(data, scale, zero_point, 1, qmin, qmax)
            return (fq - data).pow(2).sum(dim=0)

        best_err = error(lo, hi)
        for end in ("hi", "lo"):
            for alpha in ACT_MSE_GRID[:-1]:
                cand_lo, cand_hi = (lo, alpha * hi) if end == "hi" else (alpha * lo, hi)
                err = error(cand_lo, cand_hi)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                lo, hi = torch.where(better, cand_lo, lo), torch.where(better, cand_hi, hi)
        return lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.mode == "off":
            return x
        qmin, qmax = act_qrange(self.bits)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, x.dim() - 1, qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, qmin, qmax)


class QuantLinear(nn.Module):
    """A Linear with fake-quantized weights and a fake-quantized input.

    Wraps (does not copy) the original module, so its parameters stay the model's own.
    """

    def __init__(self, linear: nn.Linear, w_bits: int, input_quant: ActQuantizer, calibrator: str = "minmax") -> None:
        super().__init__()
        self.linear, self.w_bits = linear, w_bits
        self.input_quant = input_quant
        self.mode = "off"
        self.register_buffer("w_scale", weight_scale(linear.weight, w_bits, calibrator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        w = self.linear.weight
        if self.mode == "quant":
            w = fake_quant_weight(w, self.w_scale, self.w_bits)
        return F.linear(x, w, self.linear.bias)


class QuantConv2d(nn.Module):
    """The patch-embedding conv with fake-quantized weights.

    Its input (the image) is not quantized: pixels already are 8-bit, and in a sparse
    calibration image the dropped patches are still there, so an observer on it
    would see them.
    """

    def __init__(self, conv: nn.Conv2d, w_bits: int, calibrator: str = "minmax") -> None:
        super().__init__()
        self.conv, self.w_bits = conv, w_bits
        self.mode = "off"
        self.register_buffer("w_scale", weight_scale(conv.weight, w_bits, calibrator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        if self.mode == "quant":
            w = fake_quant_weight(w, self.w_scale, self.w_bits)
        return self.conv._conv_forward(x, w, self.conv.bias)
