"""Views of an image that a ViT's kept patches can follow: rolls and mirrors.

Inversion draws one :class:`RollFlip` per step and applies it as index tensors
(:class:`ViewIndex`), so a captured CUDA graph replays the step with each new draw;
block reconstruction and distillation take whole-patch views (:func:`whole_patch_views`)
to get more samples out of few images. In every case the kept patch indices follow the
pixels (:meth:`RollFlip.remap`).
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


@dataclass(frozen=True)
class ViewIndex:
    """A :class:`RollFlip` as index tensors: the same view, computed by gathers whose indices are data.

    A step that applies its view with ``torch.roll`` and ``flip`` bakes the draw into the
    kernels it launches, so a CUDA graph captured from it would replay one draw for
    ever. Here the draw is data: copy the next draw's :meth:`pack` into the tensor the
    graph reads (:meth:`unpack` makes views of it) and replay.

    Attributes:
        rows: (H,) the input row each output row shows.
        cols: (W,) the input column each output column shows.
        cells: (N,) the grid cell where each patch's content lies (:meth:`RollFlip.remap`).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    cells: torch.Tensor

    @staticmethod
    def pack(view: RollFlip, grid_size: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
        """``view``'s rows, columns and cells in one CPU tensor (one copy to the device per step)."""
        height, width = grid_size[0] * patch_size[0], grid_size[1] * patch_size[1]
        rows = torch.remainder(torch.arange(height) - view.dy, height)  # torch.roll: out[i + dy] = in[i]
        cols = torch.arange(width)
        if view.flip:
            cols = cols.flip(0)
        cols = torch.remainder(cols - view.dx, width)
        cells = view.remap(torch.arange(grid_size[0] * grid_size[1])[None], grid_size, patch_size)[0]
        return torch.cat([rows, cols, cells])

    @classmethod
    def unpack(cls, packed: torch.Tensor, grid_size: tuple[int, int], patch_size: tuple[int, int]) -> "ViewIndex":
        """Views of a tensor :meth:`pack` filled (on any device): refilling it changes the view."""
        height, width = grid_size[0] * patch_size[0], grid_size[1] * patch_size[1]
        rows, cols, cells = packed.split([height, width, grid_size[0] * grid_size[1]])
        return cls(rows, cols, cells)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`RollFlip.apply` of (B, C, H, W) images."""
        # One gather over the flattened pixels: on the CPU measured here a third the time of
        # an index_select per axis (the one along the last axis is slow), and no slower than torch.roll.
        flat = (self.rows[:, None] * x.shape[3] + self.cols).flatten()
        return x.flatten(2)[:, :, flat].view_as(x)

    def remap(self, keep: torch.Tensor) -> torch.Tensor:
        """:meth:`RollFlip.remap` of (B, K) patch indices."""
        return self.cells[keep]


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
