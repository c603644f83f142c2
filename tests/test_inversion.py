"""The inversion loop and the pool it writes: masks, manifest, resume, reproducibility."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

import sparseinv.inversion.loop as inversion
from conftest import interrupt_second_batch
from sparseinv.runs.inversion import assign_labels
from sparseinv import InversionConfig, InversionLoss, PruneSchedule, invert, invert_batch, read_pool, sparse_forward, vit_info

SPARSE = PruneSchedule(steps=(2, 4), ratios=(0.5, 0.5))  # 100 -> 50 -> 25 patches; mask keeps 25


def _config(**overrides) -> InversionConfig:
    base = dict(num_images=4, batch_size=2, iterations=6, schedule=SPARSE, seed=3)
    return InversionConfig(**{**base, **overrides})


def test_batch_shapes_masks_and_phases(tiny_vit):
    result = invert_batch(tiny_vit, torch.tensor([1, 2, 3]), _config(), seed=0, progress=False)
    assert result.images.shape == (3, 3, 160, 160)
    assert result.kept_patches.shape == (3, 25)
    assert result.tokens_per_phase == [100, 50, 25]
    assert len(result.seconds_per_phase) == 3
    for image, kept in zip(result.images, result.kept_patches):
        assert torch.equal(kept, kept.sort().values)
        energy = image.abs().sum(0).unflatten(0, (10, 16)).unflatten(2, (10, 16)).sum((1, 3)).flatten()
        stopped = torch.ones(100, dtype=torch.bool)
        stopped[kept] = False
        assert torch.all(energy[stopped] == 0)  # stopped patches are black
    assert torch.all((result.images * 255 - (result.images * 255).round()).abs() < 1e-4)  # 8-bit exact


def test_target_prob_is_the_sparse_prediction_on_the_output(tiny_vit):
    result = invert_batch(tiny_vit, torch.tensor([5, 6]), _config(), seed=1, progress=False)
    info = vit_info(tiny_vit)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = sparse_forward(tiny_vit, (result.images - mean) / std, result.kept_patches).logits.softmax(1)
    assert torch.allclose(probs[:, [5, 6]].diagonal(), result.target_prob, atol=1e-5)
    assert torch.equal(result.correct, probs.argmax(1) == torch.tensor([5, 6]))


def test_dense_keeps_every_patch(tiny_vit):
    result = invert_batch(tiny_vit, torch.tensor([0, 1]), _config(schedule=PruneSchedule()), seed=0, progress=False)
    assert result.tokens_per_phase == [100]
    assert torch.equal(result.kept_patches, torch.arange(100).expand(2, -1))


def test_seeded_runs_reproduce(tiny_vit):
    a = invert_batch(tiny_vit, torch.tensor([1, 2]), _config(), seed=7, progress=False)
    b = invert_batch(tiny_vit, torch.tensor([1, 2]), _config(), seed=7, progress=False)
    c = invert_batch(tiny_vit, torch.tensor([1, 2]), _config(), seed=8, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.kept_patches, b.kept_patches)
    assert not torch.equal(a.images, c.images)


class _RisingLoss(InversionLoss):
    """A loss whose value rises every step while its gradient moves every pixel.

    The pixel term (``1e-3 * sum``) gives Adam a real gradient, so the images change
    each step; the step count dominates the value, so the lowest loss is the first one
    seen (of a run, or of a phase once the best restarts).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def __call__(self, inputs):
        self.seen.append(inputs.images.detach().clone())
        return 1e-3 * inputs.images.sum((1, 2, 3)) + 1000.0 * len(self.seen) + 0 * inputs.logits.sum(1)


def _as_png(x: torch.Tensor, info) -> torch.Tensor:
    pixels = x * torch.tensor(info.std).view(1, 3, 1, 1) + torch.tensor(info.mean).view(1, 3, 1, 1)
    return (pixels.clamp(0, 1) * 255).round() / 255


def test_returns_best_pixels_not_last(tiny_vit):
    """With the loss rising every step, the output must be the step-0 pixels, not the moved last ones."""
    loss = _RisingLoss()
    result = invert_batch(tiny_vit, torch.tensor([0, 1]), _config(schedule=PruneSchedule(), loss=loss), seed=0, progress=False)
    info = vit_info(tiny_vit)
    first, last = _as_png(loss.seen[0], info), _as_png(loss.seen[-1], info)
    assert (first - last).abs().max() > 0.05  # the pixels really moved
    assert torch.allclose(result.images, first, atol=1e-6)


def test_labels_are_balanced_and_follow_given_classes():
    labels = assign_labels(InversionConfig(num_images=7, classes=(4, 9)), num_classes=10)
    assert labels == [4, 9, 4, 9, 4, 9, 4]
    drawn = assign_labels(InversionConfig(num_images=25, seed=1), num_classes=10)
    assert all(drawn.count(c) in (2, 3) for c in range(10))
    assert sorted(drawn[:10]) == list(range(10))


def test_pool_files_agree(tiny_vit, tmp_path):
    out = tmp_path / "pool"
    result = invert(tiny_vit, _config(num_images=3), str(out), model_name="test_vit", progress=False)
    run = json.loads((out / "run.json").read_text())
    lines = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert run["complete"] and run["num_images"] == 3 and run["model"] == "test_vit"
    assert run["tokens_per_phase"] == [100, 50, 25] and len(run["seconds_per_phase"]) == 3
    assert 0 <= run["success_rate"] <= 1 and run["wall_seconds"] > 0
    assert [l["file"] for l in lines] == [f"images/{i:06d}.png" for i in range(3)]
    assert (out / "grid.png").is_file()
    pool = read_pool(out)
    assert torch.equal(pool.images, result.images) and torch.equal(pool.labels, result.labels)
    for line, image in zip(lines, pool.images):
        with Image.open(out / line["file"]) as png:
            assert png.mode == "RGB" and png.size == (160, 160)
        black = image.abs().sum(0).unflatten(0, (10, 16)).unflatten(2, (10, 16)).sum((1, 3)).flatten() == 0
        assert set(torch.nonzero(~black).flatten().tolist()) <= set(line["kept_patches"])


def test_interrupted_run_continues_to_the_same_pool(tiny_vit, tmp_path, monkeypatch):
    config = _config(num_images=6, batch_size=2)
    invert(tiny_vit, config, str(tmp_path / "whole"), model_name="test_vit", progress=False)

    interrupt_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        invert(tiny_vit, config, str(tmp_path / "cut"), model_name="test_vit", progress=False)
    assert len(read_pool(tmp_path / "cut")) == 2  # the first batch survived
    monkeypatch.undo()

    done, real = [], inversion.invert_batch
    monkeypatch.setattr(inversion, "invert_batch", lambda *a, **k: done.append(1) or real(*a, **k))
    invert(tiny_vit, config, str(tmp_path / "cut"), model_name="test_vit", progress=False)
    assert len(done) == 2  # only the two missing batches were inverted
    whole, cut = read_pool(tmp_path / "whole"), read_pool(tmp_path / "cut")
    assert torch.equal(whole.images, cut.images) and torch.equal(whole.kept_patches, cut.kept_patches)
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["complete"]


def test_best_pixels_restart_at_each_stop(tiny_vit):
    """Losses over fewer tokens are not comparable: the output is the best of the last phase."""
    loss = _RisingLoss()
    result = invert_batch(tiny_vit, torch.tensor([0, 1]), _config(loss=loss), seed=0, progress=False)
    info = vit_info(tiny_vit)
    mask = inversion._patch_mask(result.kept_patches, info)
    last_phase_start = _as_png(loss.seen[SPARSE.steps[-1]], info) * mask  # the first step after the last stop
    run_start = _as_png(loss.seen[0], info) * mask
    assert (last_phase_start - run_start).abs().max() > 0.05  # the kept pixels moved in between
    assert torch.allclose(result.images, last_phase_start, atol=1e-6)


def test_stopped_pixels_stay_frozen_while_kept_ones_move(tiny_vit):
    """Every pixel has a gradient (the loss sums them all), yet only the kept patches change after a stop."""
    loss = _RisingLoss()
    config = _config(loss=loss, iterations=8, schedule=PruneSchedule((2, 5), (0.5, 0.5)))
    invert_batch(tiny_vit, torch.tensor([0, 1]), config, seed=0, progress=False)
    counts = config.schedule.keep_counts(100)
    for (start, end), count in zip(config.schedule.phase_bounds(config.iterations), counts):
        moved = (loss.seen[end - 1] - loss.seen[start]).abs()
        per_patch = moved.sum(1).unflatten(1, (10, 16)).unflatten(3, (10, 16)).sum((2, 4)).flatten(1)
        assert ((per_patch > 0).sum(1) == count).all(), (start, count)


def test_inversion_leaves_the_models_weights_and_flags_alone(tiny_vit):
    before = {n: p.detach().clone() for n, p in tiny_vit.named_parameters()}
    tiny_vit.head.weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in tiny_vit.named_parameters()}
    invert_batch(tiny_vit, torch.tensor([0, 1]), _config(), seed=0, progress=False)
    assert {n: p.requires_grad for n, p in tiny_vit.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in tiny_vit.named_parameters())


def test_last_phase_mask_keeps_exactly_the_patches_the_last_phase_fed(tiny_vit, monkeypatch):
    chosen = []  # (patches scored among, patches kept) at each choice
    real = inversion._top_patches

    def recording(cls_attn, current, count):
        out = real(cls_attn, current, count)
        chosen.append((current.shape[1], out.clone()))
        return out

    monkeypatch.setattr(inversion, "_top_patches", recording)
    result = invert_batch(tiny_vit, torch.tensor([1, 2]), _config(final_mask="last-phase"), seed=0, progress=False)
    last_stop = [out for among, out in chosen if among < 100][-1]  # the last stop chose among the 50 still kept
    assert torch.equal(result.kept_patches, last_stop)
    # The default; a record without the key is a pool made with rescore, from before the option.
    assert _config().record()["final_mask"] == "last-phase" and "final_mask" not in _config(final_mask="rescore").record()


def test_after_a_stop_the_optimiser_holds_only_the_kept_patches(tiny_vit, monkeypatch):
    """Adam's parameter, and so its state, its update, the clamp and the best-pixel copies,
    cover the kept patches only: a stopped pixel is not touched at all."""
    sizes = []
    real = torch.optim.Adam

    class Recording(real):
        def __init__(self, params, **kwargs):
            params = list(params)
            sizes.append(sum(p.numel() for p in params))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    invert_batch(tiny_vit, torch.tensor([0, 1]), _config(), seed=0, progress=False)
    assert sizes == [2 * 3 * count * 16 * 16 for count in SPARSE.keep_counts(100)]  # 100, 50, 25 patches


def test_kept_pixels_keep_their_adam_moments_across_a_stop(tiny_vit):
    """A fresh Adam's first step moves every pixel by exactly the learning rate; the kept
    pixels must instead go on with the moments they had before the stop."""
    seen = []

    class Recording(InversionLoss):  # the default loss, whose gradient changes from step to step
        def __call__(self, inputs):
            seen.append(inputs.images.detach().clone())
            return super().__call__(inputs)

    config = _config(loss=Recording(), iterations=6, schedule=PruneSchedule((3,), (0.5,)), lr=0.01)
    invert_batch(tiny_vit, torch.tensor([0, 1]), config, seed=0, progress=False)
    first, second = seen[3], seen[4]  # the first step after the stop, and the one after it
    moved = (second - first).abs()
    moved = moved[moved > 0]
    assert moved.numel() > 0
    # A fresh Adam moved 88% of them by exactly lr here; with the moments carried, 0.2%.
    assert ((moved - 0.01).abs() < 1e-5).float().mean() < 0.5


@pytest.mark.parametrize("color_shift", [0.0, 0.5])
def test_fed_patch_gradient_equals_the_whole_image_gradient(tiny_vit, monkeypatch, color_shift):
    """The fast path (gradient through the kept pixels each fed cell shows, after the roll,
    flip and colour shift) and the plain one (through the whole augmented image and the patch
    convolution) make the same images: a wrong roll, flip, shift or patch lookup would not."""
    config = _config(iterations=12, schedule=PruneSchedule((3, 6), (0.4, 0.4)), lr=0.05, color_shift=color_shift)
    fast = invert_batch(tiny_vit, torch.tensor([3, 4]), config, seed=2, progress=False)
    monkeypatch.setattr(inversion, "_patch_projection", lambda model: None)
    plain = invert_batch(tiny_vit, torch.tensor([3, 4]), config, seed=2, progress=False)
    assert torch.equal(fast.kept_patches, plain.kept_patches)
    assert (fast.images - plain.images).abs().max() <= 1.5 / 255  # rounding at most one 8-bit level
    assert (fast.images != plain.images).float().mean() < 0.01


def test_priors_change_the_images_and_leave_the_default_run_alone(tiny_vit):
    """The colour shift and the patch-similarity prior each change what is made; a run with
    both off makes exactly the images it made before they existed (same random stream)."""
    labels = torch.tensor([3, 4])
    base = invert_batch(tiny_vit, labels, _config(), seed=2, progress=False)
    again = invert_batch(tiny_vit, labels, _config(color_shift=0.0, loss=InversionLoss(patch_entropy=0.0, attention_prior=0.0,
                                                                                     head_similarity=0.0)), seed=2, progress=False)
    assert torch.equal(base.images, again.images)
    for changed in (_config(color_shift=0.5), _config(loss=InversionLoss(patch_entropy=1.0)), _config(loss=InversionLoss(attention_prior=1.0)),
                    _config(loss=InversionLoss(head_similarity=1.0))):
        other = invert_batch(tiny_vit, labels, changed, seed=2, progress=False)
        assert other.images.shape == base.images.shape and not torch.equal(other.images, base.images)


def test_patch_entropy_prior_rewards_a_spread_of_similarities():
    from sparseinv.inversion.losses import patch_similarity_entropy

    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2, 1 + 30, 16, generator=g)  # one class token, 30 patch tokens
    alike = spread[:, :1].expand(-1, 31, -1) + 0.01 * torch.randn(2, 31, 16, generator=g)
    assert (patch_similarity_entropy(spread, 1) > patch_similarity_entropy(alike, 1) + 1).all()
    # Only patch tokens count: changing the class token changes nothing.
    moved = spread.clone()
    moved[:, 0] += 5
    assert torch.equal(patch_similarity_entropy(moved, 1), patch_similarity_entropy(spread, 1))
    tokens = spread.clone().requires_grad_(True)
    patch_similarity_entropy(tokens, 1).sum().backward()
    assert tokens.grad[:, 1:].abs().sum() > 0 and tokens.grad[:, 0].abs().sum() == 0


def test_head_dissimilarity_is_zero_for_heads_that_agree_and_the_prior_pulls_them_together(tiny_vit):
    from sparseinv.inversion.losses import head_dissimilarity
    from sparseinv.vit.forward import AttentionMaps

    g = torch.Generator().manual_seed(0)
    one = torch.randn(2, 1, 7, 7, generator=g).softmax(-1)
    assert torch.allclose(head_dissimilarity(one.expand(-1, 3, -1, -1)), torch.zeros(2), atol=1e-6)
    scattered = torch.randn(2, 3, 7, 7, generator=g).mul(4).softmax(-1)
    assert (head_dissimilarity(scattered) > 0.1).all()
    # Inverting with the prior leaves the model's heads agreeing more on the images made. A random
    # test_vit attends almost uniformly; sharper q and k give its heads maps of their own.
    model = copy.deepcopy(tiny_vit)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim] *= 8
    labels = torch.tensor([3, 4])
    mean, std = vit_info(model).norm_tensors()

    def spread(weight: float) -> float:
        # No roll or flip: each step's shift re-cuts this random model's patches and scatters its heads anew.
        config = _config(iterations=30, schedule=PruneSchedule(), jitter=0.0, flip=False, loss=InversionLoss(head_similarity=weight))
        out = invert_batch(model, labels, config, seed=2, progress=False)
        with AttentionMaps(model) as rec, torch.no_grad():
            model((out.images - mean) / std)
        return float(torch.stack([head_dissimilarity(m) for m in rec.maps]).mean())

    assert spread(50.0) < 0.8 * spread(0.0)


def test_attention_prior_is_a_region_and_its_kl_pulls_attention_toward_it():
    from sparseinv.inversion.losses import attention_prior_kl, gaussian_attention_priors

    priors = gaussian_attention_priors(torch.Generator().manual_seed(0), 3, (14, 14))
    assert priors.shape == (3, 196) and torch.allclose(priors.sum(1), torch.ones(3))
    assert not torch.allclose(priors[0], priors[1])  # a region of its own per image
    peak = priors.view(3, 14, 14)[0].argmax()
    assert 3 <= int(peak) // 14 <= 10 and 3 <= int(peak) % 14 <= 10  # centred in the middle half
    assert torch.allclose(attention_prior_kl(priors, priors), torch.zeros(3), atol=1e-6)
    uniform = torch.full((3, 196), 1 / 196)
    assert (attention_prior_kl(uniform, priors) > 0.1).all()
    # Descending the KL moves attention logits toward the prior (scale of the prior does not matter).
    logits = torch.zeros(3, 196, requires_grad=True)
    start = float(attention_prior_kl(logits.detach().softmax(1), priors).sum())
    for _ in range(20):
        logits.grad = None
        attention_prior_kl(logits.softmax(1), 5 * priors).sum().backward()
        with torch.no_grad():
            logits -= 50 * logits.grad
    assert attention_prior_kl(logits.softmax(1), priors).sum() < 0.2 * start


def test_the_attention_prior_is_compared_where_the_image_content_went():
    """Attention that follows the image content through the step's roll and flip matches its
    prior exactly, in the dense phase (the augmented grid fed) and the sparse ones (kept tokens)."""
    from sparseinv.vit.views import RollFlip, ViewIndex
    from sparseinv.inversion.loop import prior_pairs
    from sparseinv.inversion.losses import attention_prior_kl, gaussian_attention_priors

    priors = gaussian_attention_priors(torch.Generator().manual_seed(1), 2, (4, 4))
    aug = RollFlip(dy=8, dx=-16, flip=True)
    view = ViewIndex.unpack(ViewIndex.pack(aug, (4, 4), (8, 8)), (4, 4), (8, 8))  # as the loop applies it
    every = torch.arange(16).expand(2, -1)
    following = torch.zeros(2, 16).scatter(1, aug.remap(every, (4, 4), (8, 8)), priors)  # cell remap(p) holds p's share
    assert torch.allclose(attention_prior_kl(*prior_pairs(following, priors, every, view, True)), torch.zeros(2), atol=1e-5)
    assert (attention_prior_kl(following, priors) > 0.05).all()  # read in grid order it would not match
    keep = torch.tensor([[1, 5, 6, 10], [0, 3, 12, 15]])
    fed = priors.gather(1, keep)  # token k shows kept patch keep[:, k]
    assert torch.allclose(attention_prior_kl(*prior_pairs(fed, priors, keep, view, False)), torch.zeros(2), atol=1e-5)
