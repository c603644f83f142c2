"""Views of an image that a ViT's kept patches can follow: rolls and mirrors.

Inversion draws one :class:`RollFlip` per step; block reconstruction and distillation take
whole-patch views (:func:`whole_patch_views`) to get more samples out of few images. In
every case the kept patch indices follow the pixels (:meth:`RollFlip.remap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Views of a finished image: rolls by up to this many whole patches each way, with or without a mirror.
MAX_SHIFT_PATCHES = 2
MAX_VIEWS = 2 * (2 * MAX_SHIFT_PATCHES + 1) ** 2


@dataclass(frozen=True)
class RollFlip:
    """One draw of the augmentation: roll by (dy, dx) pixels, then maybe flip horizontally."""

    dy: int
    dx: int
    flip: bool

    @classmethod
    def sample(cls, generator: torch.Generator, max_dy: int, max_dx: int, flip: bool = True) -> "RollFlip":
        """Draw shifts uniformly in ``[-max, max]`` and a fair coin for the flip."""
        draws = torch.randint(0, 1 << 30, (3,), generator=generator).tolist()
        return cls(
            dy=draws[0] % (2 * max_dy + 1) - max_dy,
            dx=draws[1] % (2 * max_dx + 1) - max_dx,
            flip=flip and bool(draws[2] % 2),
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Augment (B, C, H, W) images."""
        if self.dy or self.dx:
            x = torch.roll(x, shifts=(self.dy, self.dx), dims=(2, 3))
        return x.flip(3) if self.flip else x

    def remap(self, keep: torch.Tensor, grid_size: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
        """Grid cells where the kept patches' content lies after :meth:`apply`.

        A patch's content, rolled by a shift that is not a whole number of patches,
        straddles cells; it is fed as the cell holding most of it, i.e. the shift is
        rounded to whole patches (halves round up).
        """
        rows, cols = grid_size
        shift_r = (2 * self.dy + patch_size[0]) // (2 * patch_size[0])  # floor(dy/P + 1/2)
        shift_c = (2 * self.dx + patch_size[1]) // (2 * patch_size[1])
        r = torch.remainder(keep // cols + shift_r, rows)
        c = torch.remainder(keep % cols + shift_c, cols)
        if self.flip:
            c = cols - 1 - c
        return r * cols + c


def whole_patch_views(num_views: int, patch_size: tuple[int, int], seed: int = 0) -> list[RollFlip]:
    """The image itself, then ``num_views - 1`` distinct whole-patch rolls and mirrors, in a seeded order.

    The shifts are whole patches, so a sparse image's kept patches follow its pixels
    exactly (:meth:`RollFlip.remap`). Distillation and block reconstruction use them
    to get more samples out of few synthetic images.
    """
    shifts = range(-MAX_SHIFT_PATCHES, MAX_SHIFT_PATCHES + 1)
    identity = RollFlip(0, 0, False)
    others = [RollFlip(dy * patch_size[0], dx * patch_size[1], flip) for dy in shifts for dx in shifts for flip in (False, True)]
    others.remove(identity)
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed)).tolist()
    return [identity] + [others[i] for i in order[: num_views - 1]]
