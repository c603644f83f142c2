"""What a quantized model is: the scheme, bit-widths, quantizers and how they are fitted.

``QuantConfig.for_method(name, w_bits, a_bits)`` gives the named settings the CLI's
``--method`` selects; every field can still be set by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from sparseinv.errors import UsageError

CALIBRATORS = ("minmax", "percentile", "mse", "pmse")
SCHEMES = ("int", "psaq")
SOFTMAX_QUANTIZERS = ("uniform", "log2")
GELU_QUANTIZERS = ("uniform", "log2")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class ReconConfig:
    """Block-wise reconstruction (BRECQ with QDrop) on the calibration images.

    Block by block, the weight rounding (AdaRound) and the activation step sizes (LSQ)
    are learned so the quantized block's output matches the full-precision block's
    output, fed the outputs of the already quantized earlier blocks. The classifier
    (final norm and head) is reconstructed last, against the full-precision logits.

    Attributes:
        iters: Optimisation steps per block.
        batch_size: Images per step (all their fed tokens).
        lr_round: Adam learning rate of the rounding logits.
        lr_scale: Adam learning rate of the activation step sizes, relative to each
            step size (the step is learned on a log scale).
        round_weight: Weight of AdaRound's rounding regulariser.
        warmup: Fraction of ``iters`` before the regulariser starts.
        beta: AdaRound's annealing exponent, from the first to the second value.
        drop_prob: QDrop's probability of keeping an activation in full precision.
        views: Each calibration image is reconstructed on as this many whole-patch
            rolls and mirrors of itself (1: the image alone).
        seed: Seeds the minibatch draws and QDrop's masks.
    """

    # Learning rates chosen without real images: on DeiT-Tiny W4/A4 from 32 sparse-pool
    # images, KL(full precision || quantized) on 32 other sparse-pool images was 1.39
    # with these, 1.53 with lr_round 1e-2 and fixed step sizes, and 2.61 before
    # reconstruction. 300 steps of 8 images keep DeiT-Tiny within minutes on 2 cores.
    iters: int = 300
    batch_size: int = 8
    lr_round: float = 3e-3
    lr_scale: float = 1e-3
    round_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5
    views: int = 1
    seed: int = 0

    def validate(self) -> "ReconConfig":
        if self.iters < 1 or self.batch_size < 1:
            raise UsageError(f"reconstruction needs --recon-iters and --recon-batch-size of at least 1, got {self.iters} and {self.batch_size}.")
        if not (self.lr_round > 0 and self.lr_scale >= 0 and self.round_weight >= 0):
            raise UsageError("reconstruction learning rates must be positive and the rounding weight non-negative.")
        from sparseinv.vit.views import MAX_VIEWS

        if not 1 <= self.views <= MAX_VIEWS:
            raise UsageError(f"--recon-views {self.views} is out of range: use 1 to {MAX_VIEWS}.")
        if not 0.0 <= self.drop_prob < 1.0 or not 0.0 <= self.warmup < 1.0:
            raise UsageError(f"--recon-drop {self.drop_prob} and the warm-up must lie in [0, 1).")
        return self


@dataclass(frozen=True)
class QuantConfig:
    """Fake-quantization settings.

    Attributes:
        w_bits: Weight bit-width, 2..8 (every Linear and the patch-embedding conv),
            symmetric per output channel.
        a_bits: Activation bit-width, 2..8, asymmetric.
        scheme: Which tensors are quantized. ``int`` quantizes the inputs of every
            matrix product, as an integer engine computes them: every Linear's input,
            q and k before ``q @ k^T``, the softmax output and v before ``attn @ v``;
            the residual stream, LayerNorm, softmax and GELU stay in float. ``psaq`` is
            PSAQ-ViT's baseline: every Linear's input, the pre-softmax scores, the
            ``attn @ v`` product, every block output and the embeddings (q, k, v and
            the softmax output stay in float).
        calibrator: How activation ranges are chosen from what calibration saw:
            ``minmax``; ``percentile`` (clipped at ``percentile`` and its mirror);
            ``mse`` (the clipping, searched down to 4% of the range, with the least
            squared error); ``pmse`` (min/max or the 99.9/99.99/99.999th percentile
            clipping, whichever errs least: RepQ-ViT's). Under ``psaq`` the residual
            stream, embeddings and scores always keep min/max.
        sequential: Calibrate each activation range on the outputs of the already
            quantized layers before it (one pass with quantization on, RepQ-ViT's
            order) instead of on the full-precision model's activations (PSAQ-ViT's).
        percentile: Upper percentile for ``calibrator="percentile"``.
        weight_calibrator: ``minmax`` or ``mse`` (per-channel clipping that minimises
            the weight's squared error); ``None`` follows ``calibrator``.
        channelwise_ln: ``psaq`` only: per-channel ranges for the post-LayerNorm
            Linear inputs (not one integer kernel can run).
        ln_reparam: ``int`` only: calibrate each post-LayerNorm activation per channel,
            then fold the per-channel factors into the LayerNorm's affine parameters
            and the next Linear's weights, so one per-tensor scale serves it exactly
            (RepQ-ViT's scale reparameterisation).
        softmax_quantizer: ``int`` only: the softmax output's grid, ``uniform`` or
            ``log2`` (powers of sqrt 2, RepQ-ViT's).
        gelu_calibrator: ``int`` only: calibrator of the post-GELU activation (the
            input of ``mlp.fc2``), whose long positive tail min/max serves badly;
            ``None`` follows ``calibrator``.
        gelu_quantizer: ``int`` only: the post-GELU activation's grid, ``uniform`` or
            ``log2`` (one negative level, zero, and log2-spaced positives: powers of
            sqrt(2) from 4 bits up, coarser below,
            :class:`~sparseinv.quant.quantizers.SignedLog2Quantizer`).
        recon: Block-wise reconstruction settings; ``None`` for calibration only.
    """

    w_bits: int = 8
    a_bits: int = 8
    scheme: str = "int"
    calibrator: str = "minmax"
    percentile: float = 99.99
    sequential: bool = False
    weight_calibrator: str | None = None
    channelwise_ln: bool = False
    ln_reparam: bool = False
    softmax_quantizer: str = "uniform"
    gelu_calibrator: str | None = None
    gelu_quantizer: str = "uniform"
    recon: ReconConfig | None = None

    @classmethod
    def for_method(cls, method: str, w_bits: int = 8, a_bits: int = 8, **overrides) -> "QuantConfig":
        """The settings ``--method`` names (see :data:`METHODS`), with ``overrides`` on top."""
        if method not in METHODS:
            raise UsageError(f"unknown method '{method}': use one of {', '.join(METHODS)}.")
        config = replace(METHODS[method], w_bits=w_bits, a_bits=a_bits)
        if method == "recon" and a_bits >= 8:
            # Folding per-channel LayerNorm ranges moves their spread into the next
            # Linear's weight columns; 8-bit per-tensor ranges need no such help, and the
            # folded weights cost more than they win (DeiT-Tiny from 32 sparse images:
            # W4/A8 62.1 folded vs 65.9 not, W8/A8 69.5 vs 70.0; at W6/A6 folding wins,
            # 69.1 vs 67.6). The log2 softmax grid is coarser than uniform at 8 bits.
            config = replace(config, ln_reparam=False, softmax_quantizer="uniform")
        if method == "recon" and a_bits <= 3:
            # Eight codes on a uniform grid leave most post-GELU activations at one or two
            # levels, and reconstruction's learned step size cannot make up for it: DeiT-Tiny
            # W3/A3 from 32 sparse images scored 10.0 with the log2 grid against 5.0 uniform
            # (train100's first 20 per class). At 4 bits the learned uniform step wins (51.0
            # against 49.0), so the uniform grid stays from 4 bits up.
            config = replace(config, gelu_quantizer="log2")
        return replace(config, **overrides)

    @classmethod
    def from_record(cls, record: dict) -> "QuantConfig":
        """Inverse of :meth:`record` (reads files written before a field existed, too)."""
        record = dict(record)
        recon = record.pop("recon", None)
        if recon is not None:
            recon = ReconConfig(**{**recon, "beta": tuple(recon.get("beta", (20.0, 2.0)))})
        return cls(**record, recon=recon)

    @property
    def weight_calibrator_name(self) -> str:
        return self.weight_calibrator or ("mse" if self.calibrator == "mse" else "minmax")

    def validate(self) -> "QuantConfig":
        """Raise :class:`UsageError` for settings no quantizer can honour; return self."""
        for name, bits in (("--w-bits", self.w_bits), ("--a-bits", self.a_bits)):
            if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise UsageError(f"{name} {bits} is out of range: use a bit-width from {MIN_BITS} to {MAX_BITS}.")
        if self.scheme not in SCHEMES:
            raise UsageError(f"unknown scheme '{self.scheme}': use one of {', '.join(SCHEMES)}.")
        for name, value in (("calibrator", self.calibrator), ("GELU calibrator", self.gelu_calibrator or "minmax")):
            if value not in CALIBRATORS:
                raise UsageError(f"unknown {name} '{value}': use one of {', '.join(CALIBRATORS)}.")
        if self.weight_calibrator not in (None, "minmax", "mse"):
            raise UsageError(f"unknown weight calibrator '{self.weight_calibrator}': use minmax or mse.")
        if self.softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise UsageError(f"unknown softmax quantizer '{self.softmax_quantizer}': use uniform or log2.")
        if self.gelu_quantizer not in GELU_QUANTIZERS:
            raise UsageError(f"unknown GELU quantizer '{self.gelu_quantizer}': use uniform or log2.")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile {self.percentile} is out of range: use a value in (50, 100].")
        if self.scheme == "psaq" and (self.ln_reparam or self.softmax_quantizer != "uniform" or self.gelu_calibrator
                                      or self.gelu_quantizer != "uniform"):
            raise UsageError("the psaq scheme quantizes neither the softmax output nor per-channel-folded inputs: "
                             "LayerNorm reparameterisation, the log2 softmax and GELU grids and the GELU calibrator need --scheme int.")
        if self.scheme == "int" and self.channelwise_ln:
            raise UsageError("--channelwise-ln is for the psaq scheme; the int scheme folds per-channel ranges with LayerNorm reparameterisation.")
        if self.recon is not None:
            self.recon.validate()
        return self

    def record(self) -> dict:
        out = asdict(self)
        if self.recon is not None:
            out["recon"]["beta"] = list(self.recon.beta)
        return out

    @property
    def name(self) -> str:
        """Short label, e.g. ``W4/A4 int repq+recon``."""
        parts = [f"W{self.w_bits}/A{self.a_bits}", self.scheme, self.calibrator]
        if self.weight_calibrator and self.weight_calibrator != self.calibrator:
            parts[-1] += f" (weights {self.weight_calibrator})"
        if self.channelwise_ln:
            parts.append("+ln")
        if self.ln_reparam or self.softmax_quantizer == "log2":
            parts.append("repq")
        if self.recon is not None:
            parts.append(f"recon {self.recon.iters}")
        return " ".join(parts)


# What ``--method`` names. Every method but psaq uses the int scheme. The choices
# inside each were measured (benchmarks/results/quantization.json).
METHODS: dict[str, QuantConfig] = {
    # PSAQ-ViT's quantizer, the baseline the paper uses.
    "psaq": QuantConfig(scheme="psaq", calibrator="minmax", weight_calibrator="minmax"),
    # Every matrix-product input, plain per-tensor ranges; MSE-clipped weights need no data.
    "calib": QuantConfig(scheme="int", calibrator="pmse", weight_calibrator="mse", sequential=True),
    # + RepQ-ViT-style quantizers: folded per-channel post-LayerNorm ranges, log2 softmax
    # grid, MSE-clipped post-GELU range.
    "repq": QuantConfig(scheme="int", calibrator="pmse", weight_calibrator="mse", sequential=True, ln_reparam=True,
                        softmax_quantizer="log2", gelu_calibrator="pmse"),
}
METHODS["recon"] = replace(METHODS["repq"], recon=ReconConfig())
DEFAULT_METHOD = "recon"
