"""Fake-quantizers: the arithmetic, the range calibrators, and the quantized layers.

Weights are symmetric per output channel; activations asymmetric, per tensor (or per
last-dim channel). Every module here has a ``mode``:

* ``"off"``: identity (full precision),
* ``"observe"``: identity, but activation quantizers record what passes through,
* ``"init"``: sequential calibration: an activation quantizer sets its range from
  the first tensor it meets, then quantizes it and everything after (``"quant"``),
  so each range is fitted to the already quantized layers before it,
* ``"quant"``: fake-quantize with the calibrated scales and zero points.

The quantize-dequantize arithmetic is written out (``round(x / s) + z``, clamped,
minus ``z``, times ``s``), rounding half to even as ONNX ``QuantizeLinear`` does, with
a straight-through gradient for the rounding: the same expression serves inference,
learned step sizes (LSQ, whose gradient it gives) and learned weight rounding
(AdaRound) during block reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("off", "observe", "init", "quant")
# Clippings the ``pmse`` calibrator chooses from (RepQ-ViT's): the min/max range and
# these upper percentiles with their mirror lower ones, whichever errs least.
PMSE_PERCENTILES = (1.0, 0.99999, 0.9999, 0.999)
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
# AdaRound's rectified sigmoid stretch (Nagel et al. 2020).
ZETA, GAMMA = 1.1, -0.1


def weight_qrange(bits: int) -> tuple[int, int]:
    """Symmetric signed range, e.g. 4 bits -> (-7, 7): zero is exact and no side is favoured."""
    q = 2 ** (bits - 1) - 1
    return -q, q


def act_qrange(bits: int) -> tuple[int, int]:
    """Unsigned range for asymmetric activations, e.g. 8 bits -> (0, 255)."""
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, with the identity as its gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize and dequantize ``x``; ``scale``/``zero_point`` broadcast against it."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize ``w`` symmetric per output channel (dim 0) with ``scale`` (out,)."""
    qmin, qmax = weight_qrange(bits)
    return fake_quant(w, scale.view(-1, *([1] * (w.dim() - 1))), 0, qmin, qmax)


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


def _drop(x: torch.Tensor, xq: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """QDrop: keep each element's full-precision value with probability ``drop_prob``."""
    if drop_prob <= 0:
        return xq
    return torch.where(torch.rand_like(x) < drop_prob, x, xq)


class ActQuantizer(nn.Module):
    """Asymmetric uniform activation fake-quantizer with its own observer.

    Args:
        bits: Bit-width.
        calibrator: ``minmax``, ``percentile`` or ``mse`` (see :class:`QuantConfig`).
        percentile: Upper percentile for the ``percentile`` calibrator.
        per_channel: One range per channel of the last dimension instead of per tensor.
        device: Where its scale and zero point live: the model's device, so a calibrated
            quantizer computes where the activations are (and moves with ``.to()``).

    During block reconstruction ``scale`` is made a leaf that requires grad (LSQ) and
    ``drop_prob`` is set (QDrop); both are reset afterwards.
    """

    kind = "uniform"
    # Set by :func:`sparseinv.quant.export.export_onnx` while it traces: quantize with the torch
    # ops that become ONNX QuantizeLinear/DequantizeLinear pairs.
    exporting = False

    def __init__(self, bits: int, calibrator: str = "minmax", percentile: float = 99.99, per_channel: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.bits, self.calibrator, self.percentile, self.per_channel = bits, calibrator, percentile, per_channel
        self.mode = "off"
        self.drop_prob = 0.0
        self.register_buffer("scale", torch.empty(0, device=device))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32, device=device))
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
        elif self.calibrator == "pmse":
            lo, hi = self._pmse_range(self._sample(), lo, hi)
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
            return (fake_quant(data, scale, zero_point, qmin, qmax) - data).pow(2).sum(dim=0)

        best_err = error(lo, hi)
        for end in ("hi", "lo"):
            for alpha in ACT_MSE_GRID[:-1]:
                cand_lo, cand_hi = (lo, alpha * hi) if end == "hi" else (alpha * lo, hi)
                err = error(cand_lo, cand_hi)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                lo, hi = torch.where(better, cand_lo, lo), torch.where(better, cand_hi, hi)
        return lo, hi

    def _pmse_range(self, data: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The min/max range or a mild percentile clipping of it, whichever errs least (per channel)."""
        qmin, qmax = act_qrange(self.bits)
        best_err = best_lo = best_hi = None
        for p in PMSE_PERCENTILES:
            if p < 1.0:
                lo_c, hi_c = torch.quantile(data, torch.tensor([1.0 - p, p]), dim=0)
            else:
                lo_c, hi_c = lo, hi
            scale, zero_point = act_qparams(lo_c, hi_c, self.bits)
            err = (fake_quant(data, scale, zero_point, qmin, qmax) - data).pow(2).sum(dim=0)
            if best_err is None:
                best_err, best_lo, best_hi = err, lo_c, hi_c
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo, best_hi = torch.where(better, lo_c, best_lo), torch.where(better, hi_c, best_hi)
        return best_lo, best_hi

    def _init_from(self, x: torch.Tensor) -> None:
        """Sequential calibration: fit the range to ``x`` and quantize from now on."""
        self.reset()
        self.observe(x)
        self.finalize()
        self.mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.mode == "off":
            return x
        if self.mode == "init":
            self._init_from(x)
        qmin, qmax = act_qrange(self.bits)
        if self.exporting:  # the same arithmetic as an op torch.onnx writes as QuantizeLinear/DequantizeLinear
            return torch.fake_quantize_per_tensor_affine(x, self.scale.reshape(1).float(), self.zero_point.reshape(1).int(), qmin, qmax)
        return _drop(x, fake_quant(x, self.scale, self.zero_point, qmin, qmax), self.drop_prob)


def log2_exponent_step(bits: int) -> float:
    """The spacing, in powers of two, of :class:`Log2Quantizer`'s grid at ``bits``.

    sqrt(2) (0.5) from 4 bits up, RepQ-ViT's grid. With fewer codes a sqrt(2) grid stops
    short: at 3 bits its smallest level is ``2^-3.5``, so every softmax weight under about
    0.07 (nearly all of them over 197 tokens) became 0, and DeiT-Tiny's W3/A3 top-1 was 0.0
    whatever it was calibrated on, real images included. Coarser spacing keeps the grid
    reaching about ``2^-7`` instead: powers of 2 at 3 bits, of 4 at 2 bits.
    """
    return 0.5 if bits >= 4 else 8.0 / 2**bits


class Log2Quantizer(ActQuantizer):
    """Post-softmax probabilities on a logarithmic grid (RepQ-ViT's log-sqrt2 quantizer from 4 bits).

    ``x`` in [0, delta] becomes ``delta * 2^(-q s)`` with ``q = round(-log2(x / delta) / s)``
    in ``0 .. 2^bits - 1`` and ``s`` = :func:`log2_exponent_step` (0.5 from 4 bits up);
    anything smaller is 0. Softmax outputs are mostly tiny with a few large ones: a uniform
    4-bit grid rounds almost every weight to 0, this grid keeps them to within a factor
    sqrt(2) down to ``2^-7.5`` at 4 bits. ``delta`` (stored as ``scale``) is the largest
    value seen; ``zero_point`` is unused and 0.
    """

    kind = "log2"

    def __init__(self, bits: int, device: torch.device | str | None = None) -> None:
        super().__init__(bits, "minmax", device=device)

    @torch.no_grad()
    def finalize(self) -> None:
        if self.min_val is None:
            raise RuntimeError("activation quantizer finalised before it observed anything")
        device = self.scale.device
        self.scale = self.max_val.cpu().clamp_min(1e-8).float().to(device)
        self.zero_point = torch.zeros(1, dtype=torch.int32, device=device)
        self.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "init":
            self._init_from(x)
        if self.mode != "quant":
            return super().forward(x)
        if self.exporting:  # no logarithmic grid in standard QDQ: the uniform 8-bit grid over the same range
            low = self._low()
            step = ((self.scale - low).reshape(1) / 255).float()
            return torch.fake_quantize_per_tensor_affine(x, step, torch.round(-low / step).reshape(1).int(), 0, 255)
        with torch.no_grad():
            xq = self._on_grid(x)
        return _drop(x, x + (xq - x).detach(), self.drop_prob)

    def _low(self) -> torch.Tensor:
        """The lowest level of the grid."""
        return torch.zeros_like(self.scale)

    def _on_grid(self, x: torch.Tensor, codes: int | None = None) -> torch.Tensor:
        """``x`` rounded to ``delta * 2^(-q s)``, ``q`` in ``0 .. codes - 1`` (all the codes by default), or 0 below."""
        codes, step = codes or 2**self.bits, log2_exponent_step(self.bits)
        code = torch.round(-torch.log2((x / self.scale).clamp_min(1e-30)) / step)
        return torch.where(code >= codes, torch.zeros_like(x), self.scale * torch.exp2(-code.clamp(0, codes - 1) * step))


class SignedLog2Quantizer(Log2Quantizer):
    """The post-GELU activation: one level for the negative lobe, zero, and a logarithmic grid of positives.

    GELU's output is a shallow negative lobe (no lower than about -0.17) and a positive
    part that is mostly small with a long tail: a uniform grid spends its few codes on the
    tail, and the bulk rounds to one or two levels. With ``n = 2^bits`` codes this grid
    holds ``low`` (the lowest value seen) for anything below ``low / 2``, 0, and
    ``delta * 2^(-q s)`` for ``q`` in ``0 .. n - 3`` (``s``: :func:`log2_exponent_step`).
    The negative lobe keeps a level: zeroing it, as a plain log2 grid would, was far worse
    in a trial. DeiT-Tiny W8/A4, calibration only: 67.0 with this grid against 58.5 with
    the uniform one (train100's first 20 per class, ``benchmarks/low_bit_quantizers.py``).
    """

    kind = "log2-signed"

    def __init__(self, bits: int, device: torch.device | str | None = None) -> None:
        super().__init__(bits, device)
        self.register_buffer("low", torch.zeros(1, device=device))

    @torch.no_grad()
    def finalize(self) -> None:
        low = None if self.min_val is None else self.min_val.detach().reshape(-1)[:1].float()
        super().finalize()
        self.low = low.clamp(max=0).to(self.scale.device)

    def _low(self) -> torch.Tensor:
        return self.low

    def _on_grid(self, x: torch.Tensor, codes: int | None = None) -> torch.Tensor:
        # Two of the codes go to the negative level and to zero; positives (and nothing else) take the rest.
        positive = super()._on_grid(x, 2**self.bits - 2)
        return torch.where(x < self.low / 2, self.low.expand_as(x), torch.where(x > 0, positive, torch.zeros_like(x)))


class QuantWeight(nn.Module):
    """Per-output-channel weight quantization shared by :class:`QuantLinear` and :class:`QuantConv2d`.

    ``w_scale`` is set from the float weight; ``w_int`` (int8 codes) fixes the rounding
    once chosen (nearest, or learned by AdaRound in block reconstruction) and is what a
    quantized file stores. While ``round_logits`` exists (reconstruction), the rounding
    of each weight is soft: ``floor(w / s) + h(round_logits)``.
    """

    exporting = False  # see ActQuantizer.exporting

    def _init_weight_quant(self, weight: torch.Tensor, w_bits: int, calibrator: str) -> None:
        self.w_bits, self.weight_calibrator = w_bits, calibrator
        self.mode = "off"
        self.round_logits: nn.Parameter | None = None
        self.register_buffer("w_scale", weight_scale(weight, w_bits, calibrator))
        self.register_buffer("w_int", torch.empty(0, dtype=torch.int8, device=weight.device))

    @property
    def float_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _scale_view(self) -> torch.Tensor:
        return self.w_scale.view(-1, *([1] * (self.float_weight.dim() - 1)))

    def reset_weight_scale(self) -> None:
        """Recompute ``w_scale`` from the current float weight (after folding) and forget the rounding."""
        self.w_scale = weight_scale(self.float_weight, self.w_bits, self.weight_calibrator).to(self.w_scale.device)
        self.w_int = torch.empty(0, dtype=torch.int8, device=self.w_scale.device)

    def rounding_h(self) -> torch.Tensor:
        """AdaRound's rectified sigmoid of the rounding logits, in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.round_logits) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def start_learned_rounding(self) -> nn.Parameter:
        """Begin AdaRound: logits initialised so the soft rounding equals the float weight."""
        w = self.float_weight.detach() / self._scale_view()
        frac = (w - torch.floor(w)).clamp(1e-4, 1 - 1e-4)
        logits = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)
        self.round_logits = nn.Parameter(logits)
        return self.round_logits

    @torch.no_grad()
    def freeze_weight(self) -> None:
        """Fix the integer codes: learned rounding where there was some, else round to nearest."""
        qmin, qmax = weight_qrange(self.w_bits)
        w = self.float_weight.detach() / self._scale_view()
        if self.round_logits is not None:
            codes = torch.floor(w) + (self.rounding_h() >= 0.5).float()
        else:
            codes = torch.round(w)
        self.w_int = codes.clamp(qmin, qmax).to(torch.int8)
        self.round_logits = None

    def quant_weight(self) -> torch.Tensor:
        """The weight this module computes with in ``quant`` mode."""
        qmin, qmax = weight_qrange(self.w_bits)
        if self.round_logits is not None:
            w = torch.floor(self.float_weight.detach() / self._scale_view()) + self.rounding_h()
            return torch.clamp(w, qmin, qmax) * self._scale_view()
        if self.w_int.numel():
            w = self.w_int.float() * self._scale_view()
            if self.exporting:  # written as int8 codes + a per-channel DequantizeLinear after export
                zero = torch.zeros(self.w_scale.numel(), dtype=torch.int32, device=w.device)
                return torch.fake_quantize_per_channel_affine(w, self.w_scale.reshape(-1).float(), zero, 0, -128, 127)
            return w
        return fake_quant_weight(self.float_weight, self.w_scale, self.w_bits)

    def round_penalty(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser: pushes every soft rounding to 0 or 1 as ``beta`` falls."""
        return (1 - (2 * self.rounding_h() - 1).abs().pow(beta)).sum()


class QuantLinear(QuantWeight):
    """A Linear with fake-quantized weights and a fake-quantized input.

    Wraps (does not copy) the original module, so its parameters stay the model's own.
    ``fold_r1``/``fold_shift`` record a LayerNorm reparameterisation folded into this
    Linear (see :mod:`sparseinv.quant.reparam`); empty when there is none.
    """

    def __init__(self, linear: nn.Linear, w_bits: int, input_quant: ActQuantizer, calibrator: str = "minmax") -> None:
        super().__init__()
        self.linear = linear
        self.input_quant = input_quant
        self._init_weight_quant(linear.weight, w_bits, calibrator)
        self.register_buffer("fold_r1", torch.empty(0, device=linear.weight.device))
        self.register_buffer("fold_shift", torch.empty(0, device=linear.weight.device))

    @property
    def float_weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        w = self.quant_weight() if self.mode in ("quant", "init") else self.linear.weight
        return F.linear(x, w, self.linear.bias)


class QuantConv2d(QuantWeight):
    """The patch-embedding conv with fake-quantized weights.

    Its input (the image) is not quantized: pixels already are 8-bit, and in a sparse
    calibration image the dropped patches are still there, so an observer on it
    would see them.
    """

    def __init__(self, conv: nn.Conv2d, w_bits: int, calibrator: str = "minmax") -> None:
        super().__init__()
        self.conv = conv
        self._init_weight_quant(conv.weight, w_bits, calibrator)

    @property
    def float_weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quant_weight() if self.mode in ("quant", "init") else self.conv.weight
        return self.conv._conv_forward(x, w, self.conv.bias)


def log2_levels(bits: int) -> torch.Tensor:
    """The non-zero values of :class:`Log2Quantizer` with ``delta = 1``, largest first."""
    return torch.tensor([2.0 ** (-q * log2_exponent_step(bits)) for q in range(2**bits)])

