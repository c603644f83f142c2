"""Inversion's colour shift; the roll/flip views live with the model layer (:mod:`sparseinv.vit.views`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseinv.vit.views import MAX_SHIFT_PATCHES, MAX_VIEWS, RollFlip, whole_patch_views  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class ColorShift:
    """Plug-In Inversion's colour shift: each image's channels scaled and offset at random.

    ``x -> x * scale + offset`` in normalised space, per image and channel, with
    ``offset ~ U(-s, s)`` and ``log(scale) ~ U(-s, s)``. An image the model recognises
    under any such shift holds shapes, not one exact colour statistic, so it transfers
    better to models and quantizers that see it unshifted.
    """

    scale: torch.Tensor  # (B, C)
    offset: torch.Tensor  # (B, C)

    @staticmethod
    def draw(generator: torch.Generator, batch: int, channels: int, strength: float) -> torch.Tensor:
        """One draw on the CPU, (2, B, C): the scales, then the offsets (:meth:`of` makes the shift)."""
        draws = (torch.rand(2, batch, channels, generator=generator) * 2 - 1) * strength
        return torch.stack([draws[0].exp(), draws[1]])

    @classmethod
    def of(cls, values: torch.Tensor) -> "ColorShift":
        """The shift a :meth:`draw` holds (views of ``values``, on any device)."""
        return cls(scale=values[0], offset=values[1])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Shift (B, C, ...) images or (B, K, C, ph, pw) patches (``channel_dim`` found from the layout)."""
        if x.dim() == 4:  # (B, C, H, W)
            return x * self.scale[:, :, None, None] + self.offset[:, :, None, None]
        return x * self.scale[:, None, :, None, None] + self.offset[:, None, :, None, None]
