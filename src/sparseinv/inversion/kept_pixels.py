"""The pixels a sparse phase optimises: the kept patches only, beside the rest of the image.

After a stop, inversion no longer optimises the whole image. The optimiser's parameter
is a ``(B, 3, K, ph, pw)`` tensor of the kept patches alone, so Adam, its state, the
clamp and the best-pixel copies cost what the kept patches do, and a stopped pixel can
never move. The whole image lives in a ``canvas``: the stopped patches as they were at
their stop, and the kept ones, which the loop writes back after each update
(:meth:`KeptPixels.write`). The model sees the canvas augmented, without a graph; the
gradient reaches the kept pixels through :meth:`KeptPixels.fed_pixels`, which picks,
for each fed cell of the augmented image, the kept pixels it shows (zero where it shows
a frozen one), and through TV-L2, whose gradient is taken for the kept patches only,
each with the one-pixel ring around it (:meth:`KeptPixels.tv_l2`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseinv.vit.views import ViewIndex
from sparseinv.inversion.losses import _NEIGHBOURS, tv_l2_patches
from sparseinv.models import ViTInfo


class KeptPixels:
    """The canvas (the whole current image) and the layout of the kept patches of one batch.

    Args:
        canvas: (B, 3, H, W) the image as it is at the stop (copied); stopped patches keep these pixels.
        keep: (B, K) sorted indices of the patches still optimised.
        info: The model's patch grid.
    """

    def __init__(self, canvas: torch.Tensor, keep: torch.Tensor, info: ViTInfo) -> None:
        self.keep = keep
        self.grid = info.grid_size
        self.patch = info.patch_size
        batch, count = keep.shape
        rows, cols = self.grid
        self.index = (torch.arange(batch, device=keep.device)[:, None], keep // cols, keep % cols)
        # slot[b, p]: where patch p sits among image b's kept patches, -1 if it is frozen.
        self.slot = torch.full((batch, rows * cols), -1, dtype=torch.long, device=keep.device)
        self.slot.scatter_(1, keep, torch.arange(count, device=keep.device).expand(batch, -1))
        # The canvas sits inside a one-pixel zero border, so every kept patch has a ring to read.
        self._padded = F.pad(canvas.detach(), (1, 1, 1, 1))
        self.canvas = self._padded[:, :, 1:-1, 1:-1]
        self._tv_layout()

    def _cells(self, image: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols, C, ph, pw), a view of ``image`` by patch."""
        (ph, pw) = self.patch
        return image.unfold(2, ph, ph).unfold(3, pw, pw).permute(0, 2, 3, 1, 4, 5)

    def _halos(self) -> torch.Tensor:
        """The kept patches of the canvas, each with the one-pixel ring around it (zero outside the image):
        (K, B * C, ph + 2, pw + 2), the layout of a depthwise convolution over them."""
        (ph, pw) = self.patch
        windows = self._padded.unfold(2, ph + 2, ph).unfold(3, pw + 2, pw)  # (B, C, rows, cols, ph + 2, pw + 2), overlapping
        b, r, c = self.index
        halos = windows[b.T, :, r.T, c.T]  # (K, B, C, ph + 2, pw + 2)
        return halos.reshape(halos.shape[0], -1, ph + 2, pw + 2)

    def _tv_layout(self) -> None:
        """How many pairs of each TV direction every kept pixel is in (see :func:`tv_l2_patches`)."""
        canvas = self.canvas
        pairs = canvas.new_zeros(len(_NEIGHBOURS), *canvas.shape[2:])  # (4, H, W)
        for count, (a, b) in zip(pairs, _NEIGHBOURS):
            count[a] += 1  # a pair counts once at each of its two pixels
            count[b] += 1
        pairs = pairs.expand(canvas.shape[0], -1, -1, -1)  # (B, 4, H, W)
        self._pairs = self._cells(pairs)[self.index].permute(2, 1, 0, 3, 4)[:, :, :, None].contiguous()

    def write(self, kept: torch.Tensor) -> None:
        """Put ``kept`` (B, C, K, ph, pw) into its patches of the canvas, in place."""
        self._cells(self.canvas)[self.index] = kept.detach().permute(0, 2, 1, 3, 4)

    def tv_l2(self, kept: torch.Tensor) -> torch.Tensor:
        """:func:`sparseinv.inversion.losses.tv_l2` of the whole image, differentiable in ``kept`` (the canvas must hold ``kept``)."""
        return tv_l2_patches(kept, self.canvas, self._halos(), self._pairs)

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

    def fed_pixels(self, kept: torch.Tensor, fed: torch.Tensor, view: ViewIndex) -> torch.Tensor:
        """What the fed cells of ``view.apply(compose(kept))`` show of ``kept``, as (B, F, 3, ph, pw).

        A frozen pixel shows as zero: the result carries the gradient to the kept
        pixels (see :func:`sparseinv.vit.forward`), not the image's values.
        """
        (rows, cols), (ph, pw) = self.grid, self.patch
        ys = (fed // cols)[:, :, None] * ph + torch.arange(ph, device=fed.device)  # (B, F, ph) rows in the augmented image
        xs = (fed % cols)[:, :, None] * pw + torch.arange(pw, device=fed.device)  # (B, F, pw)
        ys, xs = view.rows[ys], view.cols[xs]  # where they came from
        patch = (ys // ph)[:, :, :, None] * cols + (xs // pw)[:, :, None, :]  # (B, F, ph, pw)
        slot = self.slot.gather(1, patch.flatten(1)).view(patch.shape)
        offset = (ys % ph)[:, :, :, None] * pw + (xs % pw)[:, :, None, :]
        flat = (slot.clamp(min=0) * (ph * pw) + offset).flatten(1)
        channels = kept.shape[1]
        picked = kept.reshape(kept.shape[0], channels, -1).gather(2, flat[:, None].expand(-1, channels, -1))
        picked = picked * (slot >= 0).flatten(1)[:, None]
        return picked.view(kept.shape[0], channels, *patch.shape[1:]).permute(0, 2, 1, 3, 4)


class KeptImages:
    """A batch's optimised pixels as the loss sees them (:class:`sparseinv.inversion.losses.Pixels`)."""

    def __init__(self, pixels: KeptPixels, kept: torch.Tensor) -> None:
        self.pixels, self.kept = pixels, kept

    def image(self) -> torch.Tensor:
        return self.pixels.compose(self.kept)

    def tv_l2(self) -> torch.Tensor:
        return self.pixels.tv_l2(self.kept)
