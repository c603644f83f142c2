"""When to stop inverting patches, and how many to keep (the paper's schedule and custom ones)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparseinv.errors import UsageError


REFERENCE_ITERATIONS = 4000
_REFERENCE_STEPS = (50, 100, 200, 300)


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
        steps = tuple(max(1, round(s * iterations / REFERENCE_ITERATIONS)) for s in _REFERENCE_STEPS)
        for i in range(1, len(steps)):  # strictly increasing, even for very short runs
            steps = steps[:i] + (max(steps[i], steps[i - 1] + 1),) + steps[i + 1 :]
        return cls(steps=steps, ratios=(0.3,) * len(steps))

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

    def keep_counts(self, num_patches: int) -> list[int]:
        """Patches kept in each phase: ``[N, n_1, ..., n_n]`` (one more entry than stops)."""
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
