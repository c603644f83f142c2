"""The settings of a distillation run, and the KD loss they configure."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from sparseinv.errors import UsageError

if TYPE_CHECKING:
    import torch

MODES = ("linear-probe", "full")
OPTIMIZERS = ("sgd", "adamw")
TARGETS = ("online", "cached")
FEATURE_LAYERS = ("final", "blocks")
ATTENTION_FORMS = ("heads", "foreground")  # see sparseinv.distill.attention
MIXES = ("none", "mixup", "cutmix")
# What a quantized student learns: its step sizes only (weight and activation), its latent
# weights and weight step sizes (activation step sizes kept), or all of them.
QAT_LEARN = ("step-sizes", "weights", "all")
# Learning rates by optimiser. SGD 0.01 for the linear probe: the paper's 0.1 diverged on
# DeiT-Tiny features (norm ~23) with T = 20 and the T^2 factor (training loss 6.9 -> 713).
# AdamW 2e-4 for whole networks: a fine-tuning rate for a pretrained ViT (DeiT's 5e-4 at
# batch 512, scaled to the small batches a pool gives); quantized students move their
# latent weights and step sizes ten times more gently, since one code step is a large jump.
DEFAULT_LR = {"sgd": 0.01, "adamw": 2e-4}
QUANTIZED_LR_FACTOR = 0.1
# The kinds of student, each with its own defaults (DistillConfig.for_student): any timm model,
# a shallower copy of the teacher (--depth/--blocks), the teacher quantized (--quantized).
STUDENT_KINDS = ("timm", "depth", "quantized")
# (feature_weight, feature_layers) for students made from the teacher: each block learns the teacher's
# tokens at its depth (held-out agreement 79.7 against 68.8 for the 6-block copy, 100 against 95.3 for
# W4/A4, with logits alone; benchmarks/distill.py).
SHALLOW_FEATURES = (1.0, "blocks")
# mix for shallower copies with online targets: real-image top-1 of the 6-block copy 21.1 against 10.4
# (128 sparse images) and 16.2 against 8.0 (512), the most accurate setting measured
# (benchmarks/results/distill_mix.json). Unmeasured for other students: off there.
SHALLOW_MIX = "mixup"
# lr for those students (AdamW): with mixup at 512 images real-image top-1 21.4 at 2e-5, 20.3 at 5e-5 and
# 16.2 at 2e-4 (benchmarks/results/distill_mix.json); a gentler rate keeps more of what the copy knows.
SHALLOW_LR = 2e-5
# attention_weight for quantized students: on 128 sparse images the head-wise term at weight 1 gave
# the W4/A4 DeiT-Tiny 53.0 train100 top-1 against 52.0 without it (foreground rows 48.0, weight 10
# 48.5), and 52.0 against 49.0 on 512 (benchmarks/qat_attention.py); it lowered the 6-block copy
# (16.5 against 20.0), so shallower copies keep it off.
QUANTIZED_ATTENTION = 1.0


@dataclass
class DistillConfig:
    """Settings of a distillation run.

    Attributes:
        mode: ``linear-probe`` (frozen backbone, fresh head) or ``full`` (every weight; a
            quantized student trains what ``qat_learn`` names).
        epochs: Passes over the images; the learning-rate schedule spans them all.
        batch_size: Images per step (the global batch under torchrun).
        temperature: Softmax temperature T of the KL loss (the paper: 20).
        optimizer: ``sgd`` (momentum) or ``adamw``; ``None``: SGD for the linear probe,
            AdamW for whole networks.
        lr: Peak learning rate; ``None`` uses :data:`DEFAULT_LR` for the optimiser
            (times :data:`QUANTIZED_LR_FACTOR` for a quantized student).
        weight_decay: ``None``: 1e-4 for SGD, 0.05 for AdamW (timm's ViT recipe), 0 for
            a quantized student's latent weights (decay would pull them off their codes).
        momentum: SGD momentum.
        warmup: Fraction of the run spent in a linear warm-up from 0 to ``lr``; a cosine
            decay to 0 follows. A fraction, not epochs: an epoch of 32 images is one step.
        crop_scale: Random-resized-crop area range (timm's training crop), or ``None`` for
            none (the default): inverted images are made under shifts and mirrors only, and
            the teacher often gives a crop of one another label than the image's
            (``benchmarks/results/distill_augment.json``), so crops teach the teacher's answers to noise.
        shift_patches: Random circular shift by a whole number of patches, up to this many
            each way. Whole patches: inverted images are made on the patch grid and keep
            their label under whole-patch shifts, not always under a few pixels' shift.
        flip: Random horizontal flips.
        mix: ``mixup`` or ``cutmix``: each sample is mixed with another image of the set
            (with probability ``mix_prob``) and the teacher labels the mixed view; ``none``.
            Needs online targets (a cached label belongs to one unmixed image).
        mix_prob: Fraction of the samples mixed.
        feature_weight: Weight of a second term, the squared difference between the
            student's and the teacher's tokens (every fed token, not only the class
            token), relative to the teacher's mean square; for ViT students as wide as
            the teacher (0: logits only).
        feature_layers: Which tokens that term compares: ``final`` (the final norm's
            output) or ``blocks`` (the residual stream after every student block against
            the teacher's at the proportional depth, see
            :func:`~sparseinv.distill.students.matched_blocks`).
        attention_weight: Weight of a third term, the head-wise attention distillation of
            :func:`~sparseinv.distill.attention.attention_loss`: each student block's
            attention maps against the teacher's at the matched block (same heads, same
            fed tokens), ``KL(teacher row || student row)`` averaged (0: off).
        attention_form: ``heads`` (every query row) or ``foreground`` (the class token's
            row and those of the patches the teacher attends to most).
        qat_learn: What a quantized student learns: ``step-sizes`` (every weight and
            activation step size, the integer codes kept: on 512 inverted images the
            W4/A4 DeiT-Tiny kept 53.8 real-image top-1 of its 54.5, against 49.8 when its
            latent weights learned too, ``benchmarks/distill.py``), ``weights`` (latent
            weights and weight step sizes, activation step sizes kept) or ``all``.
        qat_log_step_sizes: A quantized student learns each step size as its logarithm, so
            a step moves it by a fraction of itself (weight step sizes span 0.0008-0.17 on
            DeiT-Tiny W4/A4: at one absolute rate the small ones change by several times their size).
        targets: ``online``: the teacher labels every augmented view the student sees;
            ``cached``: the teacher labels each image once, un-augmented, and that label
            is reused for all of its views (cheaper, less faithful).
        seed: Seeds the fresh head, the crops and the shuffling (epoch by epoch, so a
            resumed run sees what an uninterrupted one would).
        workers: Processes that read and augment images (0: in the training process).
    """

    mode: str = "linear-probe"
    epochs: int = 10
    batch_size: int = 64
    temperature: float = 20.0
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    warmup: float = 0.05
    crop_scale: tuple[float, float] | None = None
    shift_patches: int = 2
    flip: bool = True
    mix: str = "none"
    mix_prob: float = 1.0
    feature_weight: float = 0.0
    feature_layers: str = "final"
    attention_weight: float = 0.0
    attention_form: str = "heads"
    qat_learn: str = "step-sizes"
    qat_log_step_sizes: bool = False
    targets: str = "online"
    seed: int = 0
    workers: int = 0

    @classmethod
    def for_student(cls, kind: str, **settings) -> "DistillConfig":
        """The defaults for a kind of student (:data:`STUDENT_KINDS`), under ``settings``.

        ``sparseinv distill`` resolves its options through this, so the API and the command
        train a student the same way: ``timm`` students are linear-probed; students made from
        the teacher (``depth``, ``quantized``) train in full and match the teacher's tokens at
        every block; shallower copies also mix views (online targets) at AdamW 2e-5; quantized
        ones also match the teacher's attention maps head by head (weight 1).
        """
        if kind not in STUDENT_KINDS:
            raise UsageError(f"unknown student kind '{kind}': use {', '.join(STUDENT_KINDS)}.")
        policy: dict = {"mode": "linear-probe"} if kind == "timm" else {
            "mode": "full", "feature_weight": SHALLOW_FEATURES[0], "feature_layers": SHALLOW_FEATURES[1]}
        if kind == "quantized":
            policy["attention_weight"] = QUANTIZED_ATTENTION
        if kind == "depth":
            if settings.get("targets", cls.targets) == "online":
                policy["mix"] = SHALLOW_MIX
            if settings.get("optimizer") in (None, "adamw"):
                policy["lr"] = SHALLOW_LR
        return cls(**{**policy, **settings})

    def optimizer_name(self) -> str:
        if self.optimizer is not None:
            return self.optimizer
        return "sgd" if self.mode == "linear-probe" else "adamw"

    def learning_rate(self, quantized: bool = False) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[self.optimizer_name()] * (QUANTIZED_LR_FACTOR if quantized else 1.0)

    def decay(self, quantized: bool = False) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        if quantized:
            return 0.0
        return 1e-4 if self.optimizer_name() == "sgd" else 0.05

    def lr_factor(self, t: float) -> float:
        """The schedule at ``t`` epochs into the run: warm-up, then cosine to 0."""
        warm = self.warmup * self.epochs
        if t < warm:
            return t / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(1e-9, self.epochs - warm))))

    def validate(self) -> "DistillConfig":
        """Raise :class:`UsageError` for settings no run could use."""
        if self.mode not in MODES:
            raise UsageError(f"unknown mode '{self.mode}': use {' or '.join(MODES)}.")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer '{self.optimizer}': use {' or '.join(OPTIMIZERS)}.")
        if self.targets not in TARGETS:
            raise UsageError(f"unknown targets '{self.targets}': use {' or '.join(TARGETS)}.")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not self.temperature > 0:
            raise UsageError(f"the temperature must be positive, got {self.temperature}.")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"the learning rate must be positive, got {self.lr}.")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UsageError(f"the weight decay cannot be negative, got {self.weight_decay}.")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup is a fraction of the run, 0 <= f < 1, got {self.warmup}.")
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                raise UsageError(f"--crop-scale must be two fractions 0 < lo <= hi <= 1, got {lo} {hi}.")
        if self.shift_patches < 0:
            raise UsageError(f"--shift-patches cannot be negative, got {self.shift_patches}.")
        if self.mix not in MIXES:
            raise UsageError(f"unknown --mix '{self.mix}': use {', '.join(MIXES)}.")
        if not 0 <= self.mix_prob <= 1:
            raise UsageError(f"--mix-prob is a fraction, 0 <= p <= 1, got {self.mix_prob}.")
        if self.mix != "none" and self.targets == "cached":
            raise UsageError("--mix needs the teacher to label every mixed view: use --targets online.")
        if self.feature_weight < 0:
            raise UsageError(f"--feature-weight cannot be negative, got {self.feature_weight}.")
        if self.feature_layers not in FEATURE_LAYERS:
            raise UsageError(f"unknown --feature-layers '{self.feature_layers}': use {' or '.join(FEATURE_LAYERS)}.")
        if self.feature_weight and self.targets == "cached":
            raise UsageError("--feature-weight needs the teacher's tokens on every view: use --targets online.")
        if self.attention_weight < 0:
            raise UsageError(f"--attention-weight cannot be negative, got {self.attention_weight}.")
        if self.attention_form not in ATTENTION_FORMS:
            raise UsageError(f"unknown --attention-form '{self.attention_form}': use {' or '.join(ATTENTION_FORMS)}.")
        if self.attention_weight and self.targets == "cached":
            raise UsageError("--attention-weight needs the teacher's attention on every view: use --targets online.")
        if self.qat_learn not in QAT_LEARN:
            raise UsageError(f"unknown --qat-learn '{self.qat_learn}': use {', '.join(QAT_LEARN)}.")
        if self.workers < 0:
            raise UsageError(f"--workers cannot be negative, got {self.workers}.")
        return self

    def record(self, quantized: bool = False) -> dict:
        """JSON-able settings with the defaults resolved (what the run really used)."""
        out = asdict(self)
        out.update(optimizer=self.optimizer_name(), lr=self.learning_rate(quantized), weight_decay=self.decay(quantized),
                   crop_scale=None if self.crop_scale is None else list(self.crop_scale))
        if self.mix == "none":  # recorded only when on, so a run saved before mixing existed still resumes
            del out["mix"], out["mix_prob"]
        if not self.attention_weight:  # recorded only when on, so runs saved before it existed still resume
            del out["attention_weight"], out["attention_form"]
        if not self.qat_log_step_sizes:  # recorded only when on, so runs saved before it existed still resume
            del out["qat_log_step_sizes"]
        if not quantized:  # means nothing for other students
            out.pop("qat_learn")
            out.pop("qat_log_step_sizes", None)
        return out


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge-distillation loss: ``T^2 * KL(p_teacher^T || p_student^T)``, batch mean.

    The T^2 keeps the gradient's size independent of T (Hinton et al.).

    Args:
        student_logits: (B, C) student outputs.
        teacher_logits: (B, C) teacher outputs (no gradient needed).
        temperature: T; both distributions are ``softmax(logits / T)``.

    Returns:
        A scalar tensor.
    """
    import torch.nn.functional as F  # here, not at the top: `sparseinv --help` reads this module's defaults

    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t
