"""The kept-patch layout of sparse inversion: TV-L2 from the kept patches equals the whole image's."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinv.inversion.kept_pixels import KeptPixels
from sparseinv.inversion.losses import tv_l2


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 3),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    ph=st.integers(1, 4),
    pw=st.integers(1, 4),
    share=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
def test_tv_l2_from_kept_patches_equals_the_whole_image(batch, channels, rows, cols, ph, pw, share, seed):
    """Value and gradient, for any grid, patch shape and kept set (every patch, one, or patches on the edge):
    a pair counted twice or missed at a patch border, or a neighbour outside the image, would show."""
    gen = torch.Generator().manual_seed(seed)
    info = SimpleNamespace(grid_size=(rows, cols), patch_size=(ph, pw))
    count = max(1, round(share * rows * cols))
    image = torch.randn(batch, channels, rows * ph, cols * pw, generator=gen, dtype=torch.float64)
    keep = torch.rand(batch, rows * cols, generator=gen).argsort(1)[:, :count].sort(1).values
    pixels = KeptPixels(image, keep, info)
    kept = pixels.gather(image).requires_grad_(True)
    same = kept.detach().clone().requires_grad_(True)
    weights = torch.rand(batch, generator=gen, dtype=torch.float64)
    (pixels.tv_l2(kept) * weights).sum().backward()
    (tv_l2(pixels.compose(same)) * weights).sum().backward()
    assert torch.allclose(pixels.tv_l2(kept), tv_l2(image))
    assert torch.allclose(kept.grad, same.grad, atol=1e-10)


def test_write_puts_the_kept_patches_into_the_canvas_and_nothing_else():
    info = SimpleNamespace(grid_size=(3, 4), patch_size=(2, 3))
    image = torch.randn(2, 3, 6, 12)
    keep = torch.tensor([[0, 5, 11], [2, 3, 7]])
    pixels = KeptPixels(image, keep, info)
    moved = pixels.gather(image) + 1
    pixels.write(moved)
    assert torch.equal(pixels.canvas, pixels.compose(moved))
    assert torch.equal(pixels.gather(pixels.canvas), moved)
    assert (pixels.canvas != image).sum() == moved.numel()  # frozen pixels untouched
