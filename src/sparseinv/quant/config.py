"""What a quantized model is: bit-widths and how its ranges are chosen."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparseinv.errors import UsageError

CALIBRATORS = ("minmax", "percentile", "mse")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantConfig:
    """Fake-quantization settings.

    The baseline (``calibrator="minmax"``, ``channelwise_ln=False``) is PSAQ-ViT's:
    weights symmetric per output channel, activations asymmetric per tensor, both
    with min/max ranges.

    Attributes:
        w_bits: Weight bit-width, 2..8 (Linear layers and the patch-embedding conv).
        a_bits: Activation bit-width, 2..8.
        calibrator: How ranges are chosen from what calibration saw: ``minmax``
            (the full range), ``percentile`` (activations clipped at the
            ``percentile``-th and its mirror percentile; weights min/max) or ``mse``
            (the clipping of each activation range and of each weight channel that
            minimises the squared quantization error). The residual stream and the
            embeddings always keep their min/max range: clipping their outlier
            channels costs more than the resolution it buys.
        percentile: Upper percentile for ``calibrator="percentile"``.
        weight_calibrator: How weight ranges are chosen (``minmax`` or ``mse``);
            ``None`` follows ``calibrator`` (``percentile`` then means min/max).
        channelwise_ln: Give the inputs of Linears that follow a LayerNorm (qkv, fc1,
            head) one range per channel: LayerNorm outputs have a few channels with
            ranges tens of times wider than the rest, which per-tensor ranges cannot
            serve at 4 or 6 bits (RepQ-ViT's observation).
    """

    w_bits: int = 8
    a_bits: int = 8
    calibrator: str = "minmax"
    percentile: float = 99.99
    channelwise_ln: bool = False
    weight_calibrator: str | None = None

    @property
    def weight_calibrator_name(self) -> str:
        return self.weight_calibrator or self.calibrator

    def validate(self) -> "QuantConfig":
        """Raise :class:`UsageError` for settings no quantizer can honour; return self."""
        for name, bits in (("--w-bits", self.w_bits), ("--a-bits", self.a_bits)):
            if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise UsageError(f"{name} {bits} is out of range: use a bit-width from {MIN_BITS} to {MAX_BITS}.")
        if self.calibrator not in CALIBRATORS:
            raise UsageError(f"unknown calibrator '{self.calibrator}': use one of {', '.join(CALIBRATORS)}.")
        if self.weight_calibrator not in (None, "minmax", "mse"):
            raise UsageError(f"unknown weight calibrator '{self.weight_calibrator}': use minmax or mse.")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile {self.percentile} is out of range: use a value in (50, 100].")
        return self

    def record(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        """Short label, e.g. ``W4/A8 mse+ln``."""
        extra = "+ln" if self.channelwise_ln else ""
        if self.weight_calibrator and self.weight_calibrator != self.calibrator:
            extra += f" (weights {self.weight_calibrator})"
        return f"W{self.w_bits}/A{self.a_bits} {self.calibrator}{extra}"
