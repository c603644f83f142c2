"""The pieces of distillation: run records, streamed crops, students (shallow, distilled, quantized), schedule, rounds."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

from sparseinv import InversionConfig, InversionLoss, PruneSchedule, invert, load_model
from sparseinv.distill import (
    DistillConfig,
    RoundsConfig,
    TrainImages,
    classifiers,
    distill,
    distill_with_rounds,
    pool_sources,
    prepare_student,
    shallow_copy,
    spread_blocks,
    start_qat,
)
from sparseinv.distill import data as distill_data
from sparseinv.distill.students import feature_loss, matched_blocks, trainable
from sparseinv.inversion.precision import Probes, use_probes
from sparseinv.vit.forward import OutputRecorder
from sparseinv.errors import UsageError
from sparseinv.models import timm
from sparseinv.pool import open_pool
from sparseinv.runs.inversion import pool_settings
from sparseinv.quant import load_quantized
from sparseinv.quant.model import act_quantizers, weight_modules
from sparseinv.vit.forward import sparse_forward
from conftest import teacher_and_pool, teacher_and_quantized

SCHEDULE = PruneSchedule((2, 4), (0.3, 0.3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return teacher_and_pool(tmp_path_factory.mktemp("parts"))


def teacher_of(setup):
    return load_model("test_vit", setup["ckpt"])


# ---------------------------------------------------------------- the run record


@pytest.mark.parametrize("config", [
    InversionConfig(),
    InversionConfig(num_images=7, batch_size=3, iterations=9, lr=0.1, betas=(0.4, 0.9), schedule=SCHEDULE, seed=5,
                    loss=InversionLoss(ce=0.5, tv_l2=2e-4, tv_l1=1e-5, l2=1e-6), classes=(3, 1), jitter=0.25, flip=False,
                    precision="bf16", final_mask="rescore"),
    InversionConfig(precision="auto", final_mask="last-phase", schedule=PruneSchedule.reference()),
    InversionConfig(schedule=PruneSchedule.reference(400), iterations=400, color_shift=0.5, loss=InversionLoss(patch_entropy=0.1, attention_prior=0.5, head_similarity=0.2)),
])
def test_inversion_config_round_trips_through_its_record(config):
    back = InversionConfig.from_record(json.loads(json.dumps(config.record())))
    assert back == config


def test_a_record_from_before_precision_and_final_mask_reads_as_fp32_rescore():
    record = InversionConfig(precision="bf16").record()
    del record["precision"]
    back = InversionConfig.from_record(record)
    assert (back.precision, back.final_mask) == ("fp32", "last-phase")  # last-phase is recorded; absent means rescore
    del record["final_mask"]
    assert InversionConfig.from_record(record).final_mask == "rescore"


def test_priors_that_are_off_leave_the_record_as_it_was_before_they_existed():
    record = InversionConfig().record()
    assert "color_shift" not in record and "patch_entropy" not in record["loss"]  # old pools still match and continue
    on = InversionConfig(color_shift=0.25, loss=InversionLoss(patch_entropy=0.1)).record()
    assert on["color_shift"] == 0.25 and on["loss"]["patch_entropy"] == 0.1


def test_a_record_with_extra_loss_terms_or_a_missing_setting_is_refused():
    record = InversionConfig().record()
    with pytest.raises(UsageError, match="extra loss terms"):
        InversionConfig.from_record({**record, "loss": {**record["loss"], "extra": [[1.0, "Prior"]]}})
    with pytest.raises(UsageError, match="incomplete"):
        InversionConfig.from_record({k: v for k, v in record.items() if k != "iterations"})


def test_pool_record_is_typed(setup):
    record = open_pool(setup["pool"]).record
    assert record.model == "test_vit" and record.num_classes == 5 and record.grid_size == (10, 10)
    # The format keeps the settings as recorded; the runs layer rebuilds them (the pool never imports the engine).
    assert record.settings == json.loads(json.dumps(InversionConfig(num_images=6, batch_size=3, iterations=6, schedule=SCHEDULE).record()))
    assert pool_settings(open_pool(setup["pool"])) == InversionConfig(num_images=6, batch_size=3, iterations=6, schedule=SCHEDULE)


def test_rounds_invert_with_every_setting_of_the_pool(setup, tmp_path):
    """A rescore, bf16 pool grows rescore, bf16 rounds (rebuilt by hand, the record lost both); plain rounds, so nothing is added."""
    teacher = teacher_of(setup)
    config = InversionConfig(num_images=2, batch_size=2, iterations=6, schedule=SCHEDULE, precision="bf16", final_mask="rescore", seed=3)
    with use_probes(Probes.fixed(bf16_speedup=1.0, fused_attention_slowdown=1.0)):  # tests time nothing
        invert(teacher, config, str(tmp_path / "pool"), model_name="test_vit", progress=False)
        distill_with_rounds(teacher, load_model("test_vit", setup["ckpt"]), tmp_path / "pool", DistillConfig(epochs=2, batch_size=2),
                            RoundsConfig(invert_every=1, images_per_round=2, disagreement=0.0), tmp_path / "s.safetensors", progress=False)
    grown = pool_settings(open_pool(tmp_path / "s.rounds" / "round_001"))
    assert grown == replace(config, seed=3 + 1000 + 1)


def test_distill_itself_never_inverts(setup, tmp_path, monkeypatch):
    import sparseinv.inversion.loop
    import sparseinv.runs.inversion

    def refuse(*args, **kwargs):
        raise AssertionError("distill called the inverter")

    monkeypatch.setattr(sparseinv.runs.inversion, "invert", refuse)
    monkeypatch.setattr(sparseinv.inversion.loop, "invert_batch", refuse)
    summary = distill(teacher_of(setup), load_model("test_vit", setup["ckpt"]), setup["pool"], DistillConfig(epochs=1, batch_size=3),
                      tmp_path / "s.safetensors", progress=False)
    assert summary["epoch"] == 1


# ---------------------------------------------------------------- streamed, freshly cropped images


def _images(setup, **kwargs) -> TrainImages:
    pool = open_pool(setup["pool"])
    return TrainImages(pool_sources([pool]), (160, 160), (16, 16), pool.num_kept, **kwargs)


def test_views_are_fresh_each_epoch_and_the_same_for_the_same_epoch(setup):
    images = _images(setup, seed=1, crop_scale=(0.3, 0.9))
    first = images[2][0]
    images.set_epoch(1)
    assert not torch.equal(images[2][0], first)
    images.set_epoch(0)
    assert torch.equal(images[2][0], first)
    assert not torch.equal(_images(setup, seed=2, crop_scale=(0.3, 0.9))[2][0], first)


def test_uncropped_kept_cells_are_the_pools_own_and_follow_a_mirror(setup):
    pool = open_pool(setup["pool"])
    plain = _images(setup, shift_patches=0, flip=False)
    mirrored = 0
    flipping = _images(setup, shift_patches=0, flip=True)
    for i in range(len(pool)):
        keep = torch.tensor(pool.entries[i]["kept_patches"])
        image, cells, _ = plain[i]
        assert torch.equal(cells, keep) and torch.equal(image, pool.read(i))
        image, cells, _ = flipping[i]
        if not torch.equal(image, pool.read(i)):
            mirrored += 1
            assert torch.equal(image, pool.read(i).flip(-1))
            assert torch.equal(cells, (keep // 10 * 10 + 9 - keep % 10).sort().values)
    assert 0 < mirrored < len(pool)  # both cases were checked


def test_whole_patch_shifts_move_the_kept_cells_with_the_pixels(setup):
    """The default view: a circular shift by whole patches (up to 2 each way), no mirror here."""
    pool = open_pool(setup["pool"])
    images = _images(setup, flip=False, seed=3)
    shifts = set()
    for i in range(len(pool)):
        image, cells, _ = images[i]
        original, keep = pool.read(i), torch.tensor(pool.entries[i]["kept_patches"])
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(image, torch.roll(original, (16 * dy, 16 * dx), (1, 2)))]
        assert found, "not a whole-patch shift of the image"
        dy, dx = found[0]
        moved = ((keep // 10 + dy) % 10) * 10 + (keep % 10 + dx) % 10
        assert torch.equal(cells, moved.sort().values)
        shifts.add((dy, dx))
    assert len(shifts) > 1  # shifts are drawn, not fixed


def test_a_cropped_sparse_image_feeds_the_cells_most_covered_by_kept_pixels(setup):
    images = _images(setup, crop_scale=(0.3, 0.6), seed=4)
    for i in range(len(images)):
        image, cells, _ = images[i]
        assert cells.shape == (images.num_keep,) and torch.equal(cells, cells.unique())
        # Stopped patches are black: the fed cells carry at least as much image as the cells left out.
        energy = image.abs().sum(0).view(10, 16, 10, 16).sum((1, 3)).flatten()
        left_out = torch.ones(100, dtype=torch.bool)
        left_out[cells] = False
        assert energy[cells].mean() > energy[left_out].mean()


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_mixed_view_is_made_of_its_own_image_and_another_and_keeps_its_own_cells(setup, mix):
    pool = open_pool(setup["pool"])
    plain = _images(setup, shift_patches=0, flip=False)
    mixed = _images(setup, shift_patches=0, flip=False, mix=mix, seed=5)
    originals = [pool.read(i) for i in range(len(pool))]
    partners = set()
    for i in range(len(pool)):
        image, cells, _ = mixed[i]
        assert torch.equal(cells, plain[i][1])  # the sample's own kept cells, whatever it was mixed with
        assert torch.equal(image, mixed[i][0])  # the same draw for the same (seed, epoch, index)
        own = originals[i]
        assert not torch.allclose(image, own, atol=1e-3)  # mixed (mix_prob 1), not left as it was
        for j in (j for j in range(len(pool)) if j != i):
            other = originals[j]
            if mix == "mixup":  # a blend: lam * own + (1 - lam) * other, one lam for every pixel
                differ = (own - other).abs() > 1e-3
                lam = ((image - other)[differ] / (own - other)[differ])
                found = lam.numel() > 0 and bool((lam - lam.median()).abs().max() < 1e-3)
            else:  # a box of the other image pasted over the own, nothing else changed
                from_own = torch.isclose(image, own).all(0)
                from_other = torch.isclose(image, other).all(0)
                found = bool((from_own | from_other).all()) and bool((from_other & ~from_own).any())
            if found:
                partners.add(j)
                break
        else:
            raise AssertionError(f"view {i} is not {mix} of its image and another pool image")
    assert len(partners) > 1  # partners are drawn, not fixed


def test_mixing_is_recorded_only_when_on():
    assert "mix" not in DistillConfig().record() and "mix_prob" not in DistillConfig().record()
    assert DistillConfig(mix="mixup", mix_prob=0.5).record()["mix"] == "mixup"


def test_mixing_needs_online_targets():
    with pytest.raises(UsageError, match="online"):
        DistillConfig(mix="cutmix", targets="cached").validate()
    with pytest.raises(UsageError, match="mix"):
        DistillConfig(mix="blend").validate()


def test_images_stream_from_disk_a_batch_at_a_time(setup, tmp_path, monkeypatch):
    reads = []
    real = distill_data.read_image
    monkeypatch.setattr(distill_data, "read_image", lambda path: reads.append(path) or real(path))
    student = load_model("test_vit", setup["ckpt"])
    at_first_step = []
    student.blocks[0].register_forward_pre_hook(lambda m, i: at_first_step.append(len(reads)) if not at_first_step else None)
    distill(teacher_of(setup), student, setup["pool"], DistillConfig(epochs=2, batch_size=2), tmp_path / "s.safetensors", progress=False)
    assert at_first_step == [2]  # only the first batch was read before the first step
    assert len(reads) == 2 * 6  # every image once an epoch, nothing kept between epochs


def test_sparse_and_dense_pools_together_are_refused(setup, tmp_path):
    invert(teacher_of(setup), InversionConfig(num_images=2, batch_size=2, iterations=2), str(tmp_path / "dense"), model_name="test_vit",
           progress=False)
    with pytest.raises(UsageError, match="sparse and dense"):
        distill(teacher_of(setup), load_model("test_vit", setup["ckpt"]), [setup["pool"], tmp_path / "dense"],
                DistillConfig(epochs=1), tmp_path / "s.safetensors", progress=False)


# ---------------------------------------------------------------- schedule


def test_learning_rate_warms_up_then_decays_to_zero():
    config = DistillConfig(epochs=10, warmup=0.1)
    assert config.lr_factor(0) == 0 and config.lr_factor(0.5) == pytest.approx(0.5)
    assert config.lr_factor(1.0) == pytest.approx(1.0)
    values = [config.lr_factor(t / 10) for t in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert config.lr_factor(5.5) == pytest.approx(0.5)  # the cosine's midpoint


def test_whole_networks_train_with_adamw_and_a_probe_with_sgd():
    assert DistillConfig(mode="full").optimizer_name() == "adamw"
    assert DistillConfig(mode="linear-probe").optimizer_name() == "sgd"
    assert DistillConfig(mode="full").decay(quantized=True) == 0.0


# ---------------------------------------------------------------- students


def test_spread_blocks_keeps_every_other_block_from_the_first():
    assert spread_blocks(12, 6) == [0, 2, 4, 6, 8, 10]
    assert spread_blocks(12, 12) == list(range(12)) and spread_blocks(12, 1) == [0]
    assert spread_blocks(6, 4) == [0, 1, 3, 4]
    with pytest.raises(UsageError, match="--depth"):
        spread_blocks(12, 13)


def test_a_shallow_copy_runs_the_chosen_blocks_of_the_teacher_and_loads_back(setup, tmp_path):
    teacher = teacher_of(setup)
    student = shallow_copy(teacher, [1, 4])
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(x)))
        expected = teacher.forward_head(teacher.norm(teacher.blocks[4](teacher.blocks[1](tokens))))
        assert torch.allclose(student(x), expected, atol=1e-5)
    assert len(teacher.blocks) == 6  # the teacher is untouched
    distill(teacher, student, setup["pool"], DistillConfig(mode="full", epochs=1, batch_size=3), tmp_path / "s.safetensors",
            student_name="test_vit", progress=False)
    back = load_model("test_vit", tmp_path / "s.safetensors")  # depth and classes read from the file
    assert len(back.blocks) == 2 and back.num_classes == 5
    with torch.no_grad():
        assert torch.allclose(back(x), student(x), atol=1e-6)


def test_a_distilled_deit_student_trains_both_heads(setup, tmp_path):
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_distilled_patch16_224", img_size=160, depth=2, embed_dim=64, num_heads=2).eval()
    heads = classifiers(student)
    assert len(heads) == 2
    backbone = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("head")}
    fresh = prepare_student(copy.deepcopy(student), 5, "linear-probe", seed=0).state_dict()  # the heads training starts from
    distill(teacher_of(setup), student, setup["pool"], DistillConfig(epochs=2, batch_size=3, lr=0.05), tmp_path / "s.safetensors",
            progress=False)
    state = load_file(str(tmp_path / "s.safetensors"))
    assert state["head.weight"].shape == state["head_dist.weight"].shape == (5, 64)
    assert not torch.equal(state["head.weight"], fresh["head.weight"])
    assert not torch.equal(state["head_dist.weight"], fresh["head_dist.weight"])  # both heads learned
    assert all(torch.equal(state[k], v) for k, v in backbone.items())


def _quantized(setup):
    return teacher_and_quantized(setup)


def test_qat_starts_where_post_training_ends(setup):
    _, q = _quantized(setup)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        before = q(x)
        start_qat(q)
        assert torch.equal(q(x), before)


def test_a_quantized_student_learns_and_saves_a_file_that_loads_to_the_same_model(setup, tmp_path):
    teacher, q = _quantized(setup)
    x = torch.rand(4, 3, 160, 160)
    with torch.no_grad():
        start_logits = q(x)
    biases = {n: p.clone() for n, p in q.named_parameters() if n.endswith("bias")}
    scales_before = torch.cat([m.scale.flatten() for m in q.modules() if type(m).__name__ == "ActQuantizer" and m.scale.numel()])
    out = tmp_path / "q.safetensors"
    summary = distill(teacher, q, setup["pool"], DistillConfig(mode="full", epochs=3, batch_size=3, lr=1e-3), out,
                      student_name="test_vit", progress=False)
    assert summary["settings"]["config"]["qat_learn"] == "step-sizes"  # the default
    with torch.no_grad():
        after = q(x)
    assert (after - start_logits).abs().max() > 1e-3  # training changed what it computes...
    assert all(torch.equal(p, biases[n]) for n, p in q.named_parameters() if n.endswith("bias"))  # ...not through biases
    scales_after = torch.cat([m.scale.flatten() for m in q.modules() if type(m).__name__ == "ActQuantizer" and m.scale.numel()])
    assert not torch.equal(scales_after, scales_before)  # step sizes were learned
    back = load_quantized(load_model("test_vit", setup["ckpt"]), out, "test_vit")
    with torch.no_grad():
        # The same model, not bit for bit: the file's step sizes go through other memory (an ulp, 7e-9, seen).
        assert torch.allclose(back(x), after, rtol=0, atol=1e-6)


def test_log_step_sizes_move_each_step_size_by_a_fraction_of_itself_and_save_as_plain_codes(setup, tmp_path):
    teacher, q = _quantized(setup)
    x = torch.rand(4, 3, 160, 160)
    before = {n: m.w_scale.detach().clone() for n, m in q.named_modules() if hasattr(m, "w_scale")}
    with torch.no_grad():
        start_logits = q(x)
    out = tmp_path / "q.safetensors"
    config = DistillConfig(mode="full", epochs=3, batch_size=3, lr=1e-2, qat_log_step_sizes=True)
    summary = distill(teacher, q, setup["pool"], config, out, student_name="test_vit", progress=False)
    assert summary["settings"]["config"]["qat_log_step_sizes"] is True
    assert "qat_log_step_sizes" not in DistillConfig(mode="full").record(quantized=True)  # recorded only when on
    # Every weight step size moved by at most ~lr per step relative to itself (3 steps at 1e-2): the
    # smallest ones included, which a linear-space rate moves by many times their size.
    for name, m in q.named_modules():
        if name in before:
            ratio = (m.w_scale / before[name]).flatten()
            assert float((ratio.log().abs()).max()) < 0.05, name
    assert not any("parametrizations" in n for n, _ in q.named_parameters())  # a plain quantized model again
    with torch.no_grad():
        after = q(x)
        assert (after - start_logits).abs().max() > 1e-4
        back = load_quantized(load_model("test_vit", setup["ckpt"]), out, "test_vit")
        assert torch.allclose(back(x), after, rtol=0, atol=1e-5)


@pytest.mark.parametrize("learn, latent, weight_steps, act_steps", [
    ("step-sizes", False, True, True), ("weights", True, True, False), ("all", True, True, True)])
def test_qat_learn_names_what_a_quantized_student_trains(setup, learn, latent, weight_steps, act_steps):
    _, q = _quantized(setup)
    start_qat(q)
    params = {id(p) for p in trainable(q, "full", learn)}
    modules = [m for m in weight_modules(q) if "w_scale" in m._parameters]
    scales = [a.scale for a in act_quantizers(q) if "scale" in a._parameters]
    assert modules and scales
    assert all((id(m.float_weight) in params) == latent for m in modules)
    assert all((id(m.w_scale) in params) == weight_steps for m in modules)
    assert all((id(s) in params) == act_steps for s in scales)
    assert len(params) == latent * len(modules) + weight_steps * len(modules) + act_steps * len(scales)  # nothing else


def test_a_quantized_student_refuses_the_linear_probe(setup, tmp_path):
    teacher, q = _quantized(setup)
    with pytest.raises(UsageError, match="full mode"):
        distill(teacher, q, setup["pool"], DistillConfig(mode="linear-probe"), tmp_path / "q.safetensors", progress=False)


def test_sparse_forward_of_a_shallow_copy_feeds_kept_tokens(setup):
    student = shallow_copy(teacher_of(setup), spread_blocks(6, 3))
    lengths = []
    student.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    sparse_forward(student, torch.randn(1, 3, 160, 160), torch.arange(10)[None])
    assert lengths == [11]


# ---------------------------------------------------------------- checkpoints of fine-tuned models


@pytest.mark.parametrize("wrap", ["plain", "module", "ema", "state_dict"])
def test_a_fine_tuned_checkpoint_loads_with_its_own_class_count(tmp_path, wrap):
    torch.manual_seed(3)
    state = timm.create_model("test_vit", num_classes=37).state_dict()
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "c.pth"
    if wrap == "ema":
        torch.save({"state_dict": {k: torch.zeros_like(v) for k, v in state.items()}, "state_dict_ema": state}, path)
    elif wrap == "state_dict":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save(state, path)
    model = load_model("test_vit", path)
    assert model.num_classes == 37
    expected = state["module.head.weight" if wrap == "module" else "head.weight"]
    assert torch.equal(model.head.weight, expected)  # the EMA weights where there are some


@pytest.mark.parametrize("layers", ["final", "blocks"])
def test_the_feature_term_matches_tokens_and_is_refused_where_it_cannot(setup, tmp_path, layers):
    teacher = teacher_of(setup)
    # A student that is the teacher itself: logits and tokens agree, both terms are zero.
    same = copy.deepcopy(teacher)
    config = DistillConfig(mode="full", epochs=1, batch_size=3, feature_weight=1.0, feature_layers=layers)
    summary = distill(teacher, same, setup["pool"], config, tmp_path / "same.safetensors", progress=False)
    assert summary["history"][0]["loss"] == pytest.approx(0.0, abs=1e-6)
    # A shallower copy: the feature term adds to the loss and changes what is learned.
    losses, heads = {}, {}
    for weight in (0.0, 1.0):
        student = shallow_copy(teacher, [0, 3])
        summary = distill(teacher, student, setup["pool"], replace(config, feature_weight=weight),
                          tmp_path / f"w{weight}.safetensors", progress=False)
        losses[weight], heads[weight] = summary["history"][0]["loss"], student.blocks[1].mlp.fc2.weight.detach().clone()
    assert losses[1.0] > losses[0.0] and not torch.equal(heads[0.0], heads[1.0])
    with pytest.raises(UsageError, match="--targets online"):
        DistillConfig(feature_weight=1.0, targets="cached").validate()
    with pytest.raises(UsageError, match="--feature-layers"):
        DistillConfig(feature_layers="middle").validate()
    torch.manual_seed(0)
    narrow = timm.create_model("test_vit", embed_dim=32, num_heads=2, num_classes=5).eval()
    with pytest.raises(UsageError, match="as wide as the teacher"):
        distill(teacher, narrow, setup["pool"], DistillConfig(mode="full", epochs=1, feature_weight=1.0), tmp_path / "n.safetensors",
                progress=False)


def test_block_matching_pairs_each_student_block_with_the_teacher_depth_it_stands_for():
    assert matched_blocks(6, 12) == [1, 3, 5, 7, 9, 11]  # the every-other-block copy: block and the dropped one after it
    assert matched_blocks(12, 12) == list(range(12))
    assert matched_blocks(4, 12) == [2, 5, 8, 11]
    assert matched_blocks(1, 12) == [11]


def test_block_tokens_record_the_residual_stream_after_each_block_and_the_loss_is_relative():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=5).eval()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with OutputRecorder.blocks(model) as every, OutputRecorder.blocks(model, [len(model.blocks) - 1]) as last, torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks:
            tokens = block(tokens)
    assert len(every.values) == len(model.blocks)
    assert torch.equal(every.values[-1], tokens) and torch.equal(last.values[0], tokens)
    # Relative: scaling both sides by 10 leaves the loss unchanged; a student off by 10% of the teacher scores 0.01.
    a, b = OutputRecorder([]), OutputRecorder([])
    a.values, b.values = [tokens * 1.1], [tokens]
    assert float(feature_loss(a, b)) == pytest.approx(0.01, rel=1e-4)
    a.values, b.values = [tokens * 11.0], [tokens * 10.0]
    assert float(feature_loss(a, b)) == pytest.approx(0.01, rel=1e-4)


def test_qat_state_is_read_from_the_model_and_ending_a_model_not_training_keeps_its_codes(setup):
    """end_qat on a model that is not training must not re-round its float weights (they are not its codes);
    start_qat on one already training leaves its parameters as they are (a resumed round's student)."""
    from sparseinv.quant.qat import end_qat, in_qat, qat_parameters, start_qat
    from sparseinv.quant.quantizers import weight_qrange

    _, q = teacher_and_quantized(setup)
    module = weight_modules(q)[0]
    qmin, qmax = weight_qrange(module.w_bits)
    with torch.no_grad():  # codes no rounding of the float weight gives back
        module.w_int = torch.where(module.w_int < qmax, module.w_int + 1, qmin).to(torch.int8)
    codes = module.w_int.clone()
    assert not in_qat(q)
    end_qat(q)
    assert torch.equal(module.w_int, codes)
    start_qat(q)
    params = [id(p) for p in qat_parameters(q)]
    assert in_qat(q) and [id(p) for p in qat_parameters(start_qat(q))] == params
    end_qat(q)
    assert not in_qat(q) and torch.equal(module.w_int, codes)  # trained for no steps: the same codes
