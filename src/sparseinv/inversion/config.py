"""What decides an inversion run's images: :class:`InversionConfig`, and reading it back from a record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from sparseinv.errors import UsageError
from sparseinv.inversion.schedule import STRATEGIES, PruneSchedule

if TYPE_CHECKING:
    from sparseinv.inversion.losses import InversionLoss

# The model's arithmetic during inversion (see sparseinv.inversion.precision).
PRECISIONS = ("fp32", "bf16", "auto")

# How the output mask of a sparse image is chosen after the last step: "rescore" (the
# published rule: one dense pass scores the best image, the top int(N * prod(1 - r))
# patches of all N are kept) or "last-phase" (exactly the patches the last phase fed),
# the default: it put every image on its label where rescore missed 3 of 10 and 2-6 of
# 32, with quantization from either level (benchmarks/results/final_mask.json, two seeds).
FINAL_MASKS = ("rescore", "last-phase")
# Settings added after pools were first written: a record without one was made at this value.
_ABSENT_MEANS = {"precision": "fp32", "final_mask": "rescore", "color_shift": 0.0, "strategy": "stop"}


def _loss_class():
    # Imported on use: the loss terms need torch, and this module is read by `sparseinv --help`.
    from sparseinv.inversion.losses import InversionLoss

    return InversionLoss


@dataclass
class InversionConfig:
    """Everything that decides what an inversion run produces.

    Defaults are the paper's reference setting for dense inversion; use
    ``schedule=PruneSchedule.reference()`` for sparse inversion.
    """

    num_images: int = 32
    batch_size: int = 32
    iterations: int = 4000
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.99)
    schedule: PruneSchedule = field(default_factory=PruneSchedule)
    loss: InversionLoss = field(default_factory=lambda: _loss_class()())
    classes: tuple[int, ...] | None = None
    seed: int = 0
    jitter: float = 0.125
    flip: bool = True
    precision: str = "fp32"
    final_mask: str = "last-phase"
    color_shift: float = 0.0
    strategy: str = "stop"

    def validate(self, num_classes: int | None = None) -> None:
        """Raise :class:`UsageError` for settings no run could use."""
        for name in ("num_images", "batch_size", "iterations"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise UsageError(f"the learning rate must be positive, got {self.lr}.")
        self.schedule.validate(self.iterations)
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy '{self.strategy}': use one of {', '.join(STRATEGIES)}.")
        if self.strategy == "rebirth":
            self.schedule.validate_rebirth()
        if not 0 <= self.color_shift <= 2:
            raise UsageError(f"--color-shift is a strength in [0, 2], got {self.color_shift}.")
        if self.final_mask not in FINAL_MASKS:
            raise UsageError(f"unknown final mask '{self.final_mask}': use one of {', '.join(FINAL_MASKS)}.")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision '{self.precision}': use one of {', '.join(PRECISIONS)}.")
        if self.classes is not None:
            if not self.classes:
                raise UsageError("--classes needs at least one class index.")
            if num_classes is not None:
                bad = [c for c in self.classes if not 0 <= c < num_classes]
                if bad:
                    raise UsageError(f"unknown class index {bad[0]}: the model has classes 0..{num_classes - 1}.")

    def record(self) -> dict:
        """JSON-able settings, for the run record and for matching a resumed pool."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        out["schedule"] = {"steps": list(self.schedule.steps), "ratios": list(self.schedule.ratios)}
        out["loss"] = self.loss.describe()
        out["classes"] = None if self.classes is None else list(self.classes)
        # Options added later are left out at the value they had before they existed, so pools
        # made then still continue (a pool's record without final_mask was made with rescore).
        for name, default in _ABSENT_MEANS.items():
            if out[name] == default:
                del out[name]
        return out

    @classmethod
    def from_record(cls, settings: dict) -> "InversionConfig":
        """The config a run record's ``settings`` (:meth:`record`) was written from.

        Every setting comes back, the ones a record leaves out at their old value
        included, so inverting more images "like this pool" makes images the pool's own
        run would have made (same schedule, final mask and precision).

        Raises:
            UsageError: a record that lacks a setting, or used extra loss terms (they
                are recorded by class name only and cannot be rebuilt).
        """
        s = {**_ABSENT_MEANS, **settings}
        loss = dict(s.get("loss") or {})
        if loss.pop("extra", None):
            raise UsageError("the pool was inverted with extra loss terms, which its record cannot rebuild.")
        try:
            return cls(
                num_images=int(s["num_images"]),
                batch_size=int(s["batch_size"]),
                iterations=int(s["iterations"]),
                lr=float(s["lr"]),
                betas=tuple(float(b) for b in s["betas"]),
                schedule=PruneSchedule(tuple(int(x) for x in s["schedule"]["steps"]), tuple(float(r) for r in s["schedule"]["ratios"])),
                loss=_loss_class()(**{k: float(v) for k, v in loss.items()}),
                classes=None if s["classes"] is None else tuple(int(c) for c in s["classes"]),
                seed=int(s["seed"]),
                jitter=float(s["jitter"]),
                flip=bool(s["flip"]),
                precision=str(s["precision"]),
                final_mask=str(s["final_mask"]),
                color_shift=float(s["color_shift"]),
                strategy=str(s["strategy"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"the pool's recorded settings are incomplete or damaged ({type(err).__name__}: {err}).") from None
