"""Loss terms: TV-L2's hand-written backward against autograd, and the weighted sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinv.inversion.losses import InversionLoss, LossInputs, _neighbour_diffs, tv_l1, tv_l2


def _tv_l2_autograd(x):
    return sum(d.flatten(1).norm(dim=1) for d in _neighbour_diffs(x))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(2, 9), w=st.integers(2, 9), seed=st.integers(0, 10_000), flat=st.booleans())
def test_tv_l2_matches_autograd(b, h, w, seed, flat):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=gen, dtype=torch.float64)
    if flat:
        x[0] = 1.0  # an all-constant image: zero differences, zero gradient
    weights = torch.rand(b, generator=gen, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    c = x.clone().requires_grad_(True)
    (tv_l2(a) * weights).sum().backward()
    (_tv_l2_autograd(c) * weights).sum().backward()
    assert torch.allclose(tv_l2(x), _tv_l2_autograd(x))
    assert torch.allclose(a.grad, torch.nan_to_num(c.grad), atol=1e-10)
    assert torch.autograd.gradcheck(tv_l2, (torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True),))


def test_tv_l2_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])  # one image, one channel, 2x2
    # horizontal: (-1, 0) -> 1; vertical: (0, 1) -> 1; diagonals: (0 - 1) -> 1 and (0 - 0) -> 0
    assert torch.allclose(tv_l2(x), torch.tensor([3.0]))


def test_inversion_loss_sums_its_terms():
    x = torch.randn(2, 3, 8, 8)
    logits = torch.randn(2, 5)
    targets = torch.tensor([1, 4])
    inputs = LossInputs(images=x, logits=logits, targets=targets)
    extra = lambda i: i.images.mean((1, 2, 3))  # noqa: E731
    loss = InversionLoss(ce=2.0, tv_l2=0.5, tv_l1=0.25, l2=0.1, extra=[(3.0, extra)])(inputs)
    expected = (
        2.0 * F.cross_entropy(logits, targets, reduction="none")
        + 0.5 * tv_l2(x) + 0.25 * tv_l1(x) + 0.1 * x.flatten(1).norm(dim=1) + 3.0 * x.mean((1, 2, 3))
    )
    assert torch.allclose(loss, expected)
    default = InversionLoss()(inputs)
    assert torch.allclose(default, F.cross_entropy(logits, targets, reduction="none") + 1e-4 * tv_l2(x))


def test_loss_inputs_compose_images_only_when_a_term_asks():
    """Given the optimised pixels, the default loss never composes the image; a term reading
    ``images`` gets it once, and TV-L2 comes from the pixels' own (cheaper) path."""
    x = torch.randn(2, 3, 8, 8)

    class Pixels:
        composed = 0

        def image(self):
            Pixels.composed += 1
            return x

        def tv_l2(self):
            return tv_l2(x) + 1.0  # marks which path ran

    logits, targets = torch.randn(2, 5), torch.tensor([1, 4])
    ce = F.cross_entropy(logits, targets, reduction="none")
    inputs = LossInputs(logits=logits, targets=targets, pixels=Pixels())
    assert torch.allclose(InversionLoss(tv_l2=0.5)(inputs), ce + 0.5 * (tv_l2(x) + 1.0))
    assert Pixels.composed == 0
    assert torch.equal(inputs.images, x) and torch.equal(inputs.images, x) and Pixels.composed == 1
    with pytest.raises(ValueError, match="one of images or pixels"):
        LossInputs(logits=logits, targets=targets)
