"""Schedule arithmetic and kept-index remapping under roll and flip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinv import PruneSchedule, UsageError
from sparseinv.vit.views import RollFlip, ViewIndex


def test_reference_schedule_keeps_196_137_95_66_46():
    schedule = PruneSchedule.reference()
    assert schedule.keep_counts(196) == [196, 137, 95, 66, 46]
    assert schedule.final_keep(196) == 47  # int(196 * 0.7**4) = int(47.06)
    assert schedule.phase_bounds(4000) == [(0, 50), (50, 100), (100, 200), (200, 300), (300, 4000)]


def test_dense_is_the_empty_schedule():
    schedule = PruneSchedule()
    assert schedule.is_dense
    assert schedule.keep_counts(196) == [196]
    assert schedule.final_keep(196) == 196
    assert schedule.phase_bounds(10) == [(0, 10)]


@pytest.mark.parametrize(
    "steps, ratios, message",
    [
        ((100, 50), (0.3, 0.3), "strictly increasing"),
        ((50, 50), (0.3, 0.3), "strictly increasing"),
        ((50, 400), (0.3, 0.3), "must lie in"),
        ((0, 50), (0.3, 0.3), "must lie in"),
        ((50,), (1.0,), r"\[0, 1\)"),
        ((50,), (-0.1,), r"\[0, 1\)"),
        ((50, 100), (0.3,), "one ratio per step"),
    ],
)
def test_bad_schedules_are_refused(steps, ratios, message):
    with pytest.raises(UsageError, match=message):
        PruneSchedule(steps, ratios).validate(iterations=400)


def _brute_force_cell(patch: int, aug: RollFlip, rows: int, cols: int, size: int) -> set[int]:
    """Cells holding the most of ``patch``'s pixels after the augmentation."""
    marker = torch.zeros(1, 1, rows * size, cols * size)
    r, c = divmod(patch, cols)
    marker[:, :, r * size : (r + 1) * size, c * size : (c + 1) * size] = 1
    moved = aug.apply(marker)[0, 0]
    overlap = moved.unflatten(0, (rows, size)).unflatten(2, (cols, size)).sum((1, 3)).flatten()
    return set(torch.nonzero(overlap == overlap.max()).flatten().tolist())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(2, 6),
    cols=st.integers(2, 6),
    size=st.sampled_from([2, 4, 5]),
    data=st.data(),
)
def test_remap_follows_pixels(rows, cols, size, data):
    dy = data.draw(st.integers(-rows * size, rows * size))
    dx = data.draw(st.integers(-cols * size, cols * size))
    aug = RollFlip(dy=dy, dx=dx, flip=data.draw(st.booleans()))
    keep = torch.arange(rows * cols)[None]
    mapped = aug.remap(keep, (rows, cols), (size, size))[0].tolist()
    for patch, cell in enumerate(mapped):
        assert cell in _brute_force_cell(patch, aug, rows, cols, size)
    assert sorted(mapped) == list(range(rows * cols))  # a permutation: no two patches collide


def test_remapped_tokens_carry_the_kept_content(tiny_vit):
    """The cells fed after augmentation hold exactly the kept patches' (mirrored) pixels."""
    x = torch.randn(1, 3, 160, 160)
    keep = torch.tensor([[0, 13, 57, 99]])
    aug = RollFlip(dy=32, dx=-48, flip=True)  # whole patches, so content moves exactly
    fed = aug.remap(keep, (10, 10), (16, 16))[0]
    cells = aug.apply(x)[0].unflatten(1, (10, 16)).unflatten(3, (10, 16))  # (3, row, y, col, x)
    patches = x[0].unflatten(1, (10, 16)).unflatten(3, (10, 16))
    for patch, cell in zip(keep[0].tolist(), fed.tolist()):
        got = cells[:, cell // 10, :, cell % 10, :]
        want = patches[:, patch // 10, :, patch % 10, :].flip(-1)
        assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(2, 6), cols=st.integers(2, 6), size=st.sampled_from([2, 4, 5]), data=st.data())
def test_a_view_as_index_tensors_is_the_view(rows, cols, size, data):
    # The captured step applies its roll and flip as gathers whose indices are data.
    aug = RollFlip(dy=data.draw(st.integers(-rows * size, rows * size)), dx=data.draw(st.integers(-cols * size, cols * size)),
                   flip=data.draw(st.booleans()))
    view = ViewIndex.unpack(ViewIndex.pack(aug, (rows, cols), (size, size)), (rows, cols), (size, size))
    x = torch.randn(2, 3, rows * size, cols * size)
    assert torch.equal(view.apply(x), aug.apply(x))
    keep = torch.stack([torch.randperm(rows * cols)[: rows * cols // 2] for _ in range(2)])
    assert torch.equal(view.remap(keep), aug.remap(keep, (rows, cols), (size, size)))
