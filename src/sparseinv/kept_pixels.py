"""The pixels a sparse phase optimises: the kept patches only, beside the frozen image.

After a stop, inversion no longer optimises the whole image. The stopped patches are
frozen into a ``canvas``; the optimiser's parameter is a ``(B, 3, K, ph, pw)`` tensor
of the kept patches alone, so Adam, its state, the clamp and the best-pixel copies cost
what the kept patches do, and a stopped pixel can never move. The model still sees the
whole augmented image (:meth:`KeptPixels.compose`), and the gradient reaches the kept
pixels through :meth:`KeptPixels.fed_pixels`, which picks, for each fed cell of the
augmented image, the kept pixels it shows (zero where it shows a frozen one).
"""

from __future__ import annotations

import torch

from sparseinv.augment import RollFlip
from sparseinv.models import ViTInfo


class KeptPixels:
    """The frozen canvas and the layout of the kept patches of one batch.

    Args:
        canvas: (B, 3, H, W) the image as it is at the stop; stopped patches keep these pixels.
        keep: (B, K) sorted indices of the patches still optimised.
        info: The model's patch grid.
    """

    def __init__(self, canvas: torch.Tensor, keep: torch.Tensor, info: ViTInfo) -> None:
        self.canvas = canvas.detach()
        self.keep = keep
        self.grid = info.grid_size
        self.patch = info.patch_size
        batch, count = keep.shape
        rows, cols = self.grid
        self.index = (torch.arange(batch, device=keep.device)[:, None], keep // cols, keep % cols)
        # slot[b, p]: where patch p sits among image b's kept patches, -1 if it is frozen.
        self.slot = torch.full((batch, rows * cols), -1, dtype=torch.long, device=keep.device)
        self.slot.scatter_(1, keep, torch.arange(count, device=keep.device).expand(batch, -1))

    def _cells(self, image: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols, 3, ph, pw), a view of ``image`` by patch."""
        (rows, cols), (ph, pw) = self.grid, self.patch
        return image.view(image.shape[0], image.shape[1], rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5)

    def gather(self, image: torch.Tensor) -> torch.Tensor:
        """The kept patches of a (B, C, H, W) ``image``, as (B, C, K, ph, pw)."""
        return self._cells(image)[self.index].permute(0, 2, 1, 3, 4).contiguous()

    def compose(self, kept: torch.Tensor) -> torch.Tensor:
        """The whole image: the canvas with ``kept`` (B, 3, K, ph, pw) in its patches (differentiable in ``kept``)."""
        cells = self._cells(self.canvas).index_put(self.index, kept.permute(0, 2, 1, 3, 4))
        return cells.permute(0, 3, 1, 4, 2, 5).reshape(self.canvas.shape)

    def select(self, kept: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The patches of ``kept`` (laid out by this object's keep) at ``keep``, a subset, as (B, C, K', ph, pw)."""
        slots = self.slot.gather(1, keep)
        return kept.gather(2, slots[:, None, :, None, None].expand(-1, kept.shape[1], -1, *kept.shape[3:]))

    def fed_pixels(self, kept: torch.Tensor, fed: torch.Tensor, aug: RollFlip) -> torch.Tensor:
        """What the fed cells of ``aug.apply(compose(kept))`` show of ``kept``, as (B, F, 3, ph, pw).

        A frozen pixel shows as zero: the result carries the gradient to the kept
        pixels (see :func:`sparseinv.sparse_forward`), not the image's values.
        """
        (rows, cols), (ph, pw) = self.grid, self.patch
        height, width = rows * ph, cols * pw
        ys = (fed // cols)[:, :, None] * ph + torch.arange(ph, device=fed.device)  # (B, F, ph) rows in the augmented image
        xs = (fed % cols)[:, :, None] * pw + torch.arange(pw, device=fed.device)  # (B, F, pw)
        if aug.flip:
            xs = width - 1 - xs
        ys, xs = torch.remainder(ys - aug.dy, height), torch.remainder(xs - aug.dx, width)  # where they came from
        patch = (ys // ph)[:, :, :, None] * cols + (xs // pw)[:, :, None, :]  # (B, F, ph, pw)
        slot = self.slot.gather(1, patch.flatten(1)).view(patch.shape)
        offset = (ys % ph)[:, :, :, None] * pw + (xs % pw)[:, :, None, :]
        flat = (slot.clamp(min=0) * (ph * pw) + offset).flatten(1)
        channels = kept.shape[1]
        picked = kept.reshape(kept.shape[0], channels, -1).gather(2, flat[:, None].expand(-1, channels, -1))
        picked = picked * (slot >= 0).flatten(1)[:, None]
        return picked.view(kept.shape[0], channels, *patch.shape[1:]).permute(0, 2, 1, 3, 4)
