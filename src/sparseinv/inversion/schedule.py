"""When to stop inverting patches, and how many to keep (the paper's schedule and custom ones)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparseinv.errors import UsageError


REFERENCE_ITERATIONS = 4000
_REFERENCE_STEPS = (50, 100, 200, 300)
# Patch Rebirth's default (see docs/rebirth.md): detachments at 10%, 20% and 40% of the
# run, a quarter of all patches each; the last quarter is detached when the run ends.
_REBIRTH_STEPS = (400, 800, 1600)
_REBIRTH_SHARE = 0.25

# What happens at a stop step: "stop" (Sparse Model Inversion: the least-attended kept
# patches stop and leave the output) or "rebirth" (Patch Rebirth Inversion: the
# most-attended still-optimised patches are detached into the output, frozen, and the
# rest keep inverting; the ratio at each stop is then a share of all patches).
STRATEGIES = ("stop", "rebirth")


def _scaled(steps: tuple[int, ...], iterations: int) -> tuple[int, ...]:
    """Stop steps of a 4000-step run scaled to ``iterations``, kept strictly increasing even for very short runs."""
    out = [max(1, round(s * iterations / REFERENCE_ITERATIONS)) for s in steps]
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    return tuple(out)


@dataclass(frozen=True)
class PruneSchedule:
    """Stop steps ``t_1 < ... < t_n`` and the fraction ``r_k`` of kept patches stopped at each.

    The empty schedule is dense inversion. At step ``t_k`` the ``n_k`` patches still
    kept shrink to ``int(n_k * (1 - r_k))``.
    """

    steps: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()

    @classmethod
    def reference(cls, iterations: int = REFERENCE_ITERATIONS) -> "PruneSchedule":
        """The paper's schedule: steps 50/100/200/300 of 4000, ratio 0.3 each (196 -> 46 patches).

        For a run of other length the stop steps are scaled by ``iterations / 4000``, so
        each phase keeps its share of the run (400 steps: 5/10/20/30).
        """
        steps = _scaled(_REFERENCE_STEPS, iterations)
        return cls(steps=steps, ratios=(0.3,) * len(steps))

    @classmethod
    def rebirth(cls, iterations: int = REFERENCE_ITERATIONS) -> "PruneSchedule":
        """Patch Rebirth's default: detach 25% of all patches at 10%, 20% and 40% of the run
        (steps 400/800/1600 of 4000, scaled like :meth:`reference`); the last 25% at the end."""
        steps = _scaled(_REBIRTH_STEPS, iterations)
        return cls(steps=steps, ratios=(_REBIRTH_SHARE,) * len(steps))

    @property
    def is_dense(self) -> bool:
        return not self.steps

    def validate(self, iterations: int) -> None:
        """Raise :class:`UsageError` unless the schedule fits a run of ``iterations`` steps."""
        if len(self.steps) != len(self.ratios):
            raise UsageError(
                f"--prune-at has {len(self.steps)} steps but --prune-ratio has {len(self.ratios)} ratios; give one ratio per step."
            )
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise UsageError(f"stop steps must be strictly increasing, got {list(self.steps)}.")
        if self.steps and (self.steps[0] < 1 or self.steps[-1] >= iterations):
            raise UsageError(f"stop steps must lie in 1..{iterations - 1} (--iterations is {iterations}), got {list(self.steps)}.")
        for r in self.ratios:
            if not (0.0 <= r < 1.0) or math.isnan(r):
                raise UsageError(f"prune ratios must lie in [0, 1), got {r}.")

    def validate_rebirth(self, num_patches: int | None = None) -> None:
        """Raise :class:`UsageError` unless the detachments leave patches to optimise after the last stop."""
        if self.is_dense:
            raise UsageError("--schedule rebirth needs stop steps: it takes no --dense.")
        if sum(self.ratios) >= 1 or any(r <= 0 for r in self.ratios):
            raise UsageError(f"rebirth detaches a share of all patches at each stop: the ratios must be positive and sum "
                             f"below 1, got {list(self.ratios)}.")
        if num_patches is not None and min(self.detach_counts(num_patches)) < 1:
            raise UsageError(f"rebirth ratios {list(self.ratios)} detach no patch of {num_patches} at some stop.")

    def detach_counts(self, num_patches: int) -> list[int]:
        """Rebirth: patches detached at each stop, ``int(N * r_k)`` (the rest are detached at the end)."""
        return [int(num_patches * r) for r in self.ratios]

    def keep_counts(self, num_patches: int, strategy: str = "stop") -> list[int]:
        """Patches optimised in each phase: ``[N, n_1, ..., n_n]`` (one more entry than stops).

        Stop: ``n_k = int(n_{k-1} * (1 - r_k))``. Rebirth: ``n_k = n_{k-1} - int(N * r_k)``.
        """
        if strategy == "rebirth":
            counts = [num_patches]
            for d in self.detach_counts(num_patches):
                counts.append(counts[-1] - d)
            return counts
        counts = [num_patches]
        for r in self.ratios:
            counts.append(max(1, int(counts[-1] * (1 - r))))
        return counts

    def final_keep(self, num_patches: int) -> int:
        """Patches kept in the output mask: ``int(N * prod(1 - r_k))``."""
        return max(1, int(num_patches * math.prod(1 - r for r in self.ratios)))

    def phase_bounds(self, iterations: int) -> list[tuple[int, int]]:
        """``[start, end)`` step ranges of each phase, one per entry of :meth:`keep_counts`."""
        edges = [0, *self.steps, iterations]
        return list(zip(edges[:-1], edges[1:]))
