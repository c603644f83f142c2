"""Attention distillation: recorded maps, the row-KL term, foreground rows, and the term inside a run."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from sparseinv import load_model
from sparseinv.distill import DistillConfig, distill, shallow_copy
from sparseinv.distill.attention import attention_loss, foreground_rows, row_kl
from sparseinv.errors import UsageError
from sparseinv.models import timm
from sparseinv.quant.model import act_quantizers
from sparseinv.vit.forward import AttentionMaps, sparse_forward
from conftest import teacher_and_pool, teacher_and_quantized


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return teacher_and_pool(tmp_path_factory.mktemp("attn"))


def _teacher(setup):
    return load_model("test_vit", setup["ckpt"])


def test_maps_are_each_blocks_softmax_over_the_fed_tokens_and_fusion_comes_back(setup):
    model = _teacher(setup)
    fused = [b.attn.fused_attn for b in model.blocks]
    x = torch.randn(2, 3, 160, 160)
    keep = torch.tensor([[0, 5, 7, 9], [1, 2, 3, 4]])
    with AttentionMaps(model) as rec, torch.no_grad():
        sparse_forward(model, x, keep)
    heads, tokens = model.blocks[0].attn.num_heads, 1 + keep.shape[1]
    assert [tuple(m.shape) for m in rec.maps] == [(2, heads, tokens, tokens)] * len(model.blocks)
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in rec.maps)
    assert [b.attn.fused_attn for b in model.blocks] == fused
    with AttentionMaps(model, [1]) as last, torch.no_grad():
        sparse_forward(model, x, keep)
    assert torch.allclose(last.maps[0], rec.maps[1], atol=1e-5)  # block 0 runs fused this time: not bit-equal


def test_the_row_kl_is_zero_for_the_same_maps_and_grows_as_they_part():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 5, 5).softmax(-1)
    assert float(attention_loss([t], [t])) == pytest.approx(0.0, abs=1e-6)
    near = (torch.log(t) + 0.1 * torch.randn_like(t)).softmax(-1)
    far = (torch.log(t) + 1.0 * torch.randn_like(t)).softmax(-1)
    assert 0 < float(attention_loss([near], [t])) < float(attention_loss([far], [t]))
    # KL(teacher || student), not the reverse: the teacher's rows weigh the log-ratio.
    expected = (t * (t.log() - near.log())).sum(-1).mean()
    assert float(attention_loss([near], [t])) == pytest.approx(float(expected), rel=1e-5)
    assert float(row_kl(t, near).mean()) == pytest.approx(float(expected), rel=1e-5)


def test_foreground_rows_are_the_prefix_and_the_most_attended_patches():
    maps = torch.full((1, 2, 5, 5), 0.01)
    maps[0, :, 0, 1:] = torch.tensor([0.1, 0.6, 0.05, 0.25])  # the class token's attention to four patches
    rows = foreground_rows(maps, num_prefix=1, share=0.5)
    assert rows.tolist() == [[True, False, True, False, True]]
    # Only those rows count: a student wrong on the background rows alone is not penalised.
    student = maps.clone()
    student[0, :, 1] = torch.tensor([0.9, 0.025, 0.025, 0.025, 0.025])  # a background row
    teacher = maps / maps.sum(-1, keepdim=True)
    student = student / student.sum(-1, keepdim=True)
    assert float(attention_loss([student], [teacher], "foreground")) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_loss([student], [teacher], "heads")) > 0.01


def _quantized(setup):
    return teacher_and_quantized(setup)


def test_the_term_trains_the_quantized_students_q_and_k_step_sizes(setup, tmp_path):
    """The maps are recorded with their graph: the term reaches the step sizes behind q, k and the softmax."""
    learned = {}
    # Against a negligible weight, not 0: with the term on, the teacher's attention runs unfused, which
    # alone changes the numbers; only the term's gradient separates these two runs.
    for weight in (1e-9, 5.0):
        teacher, q = _quantized(setup)
        config = DistillConfig(mode="full", epochs=2, batch_size=3, lr=1e-3, attention_weight=weight)
        summary = distill(teacher, q, setup["pool"], config, tmp_path / f"w{weight}.safetensors", progress=False,
                          teacher_name="test_vit", student_name="test_vit")
        learned[weight] = torch.cat([m.scale.detach().flatten() for m in act_quantizers(q)])
        assert summary["settings"]["config"]["attention_weight"] == weight
    assert float((learned[5.0] - learned[1e-9]).abs().max() / learned[1e-9].abs().max()) > 1e-3
    off = DistillConfig(mode="full").record(quantized=True)
    assert "attention_weight" not in off and "attention_form" not in off  # recorded only when on: older runs still resume


def test_a_student_that_is_the_teacher_scores_zero_and_a_shallow_copy_does_not(setup, tmp_path):
    teacher = _teacher(setup)
    config = DistillConfig(mode="full", epochs=1, batch_size=3, attention_weight=1.0, lr=1e-12)
    same = distill(teacher, copy.deepcopy(teacher), setup["pool"], config, tmp_path / "same.safetensors", progress=False)
    assert same["history"][0]["loss"] == pytest.approx(0.0, abs=1e-6)
    plain = distill(teacher, shallow_copy(teacher, [0]), setup["pool"], replace(config, attention_weight=0.0),
                    tmp_path / "plain.safetensors", progress=False)
    with_term = distill(teacher, shallow_copy(teacher, [0]), setup["pool"], config, tmp_path / "term.safetensors", progress=False)
    assert with_term["history"][0]["loss"] > plain["history"][0]["loss"] + 1e-4


def test_the_term_is_refused_where_it_cannot_compare(setup, tmp_path):
    teacher = _teacher(setup)
    with pytest.raises(UsageError, match="--targets online"):
        DistillConfig(attention_weight=1.0, targets="cached").validate()
    with pytest.raises(UsageError, match="--attention-form"):
        DistillConfig(attention_form="middle").validate()
    with pytest.raises(UsageError, match="cannot be negative"):
        DistillConfig(attention_weight=-1.0).validate()
    torch.manual_seed(0)
    other_heads = timm.create_model("test_vit", num_heads=4, num_classes=5).eval()
    with pytest.raises(UsageError, match="heads per block"):
        distill(teacher, other_heads, setup["pool"], DistillConfig(mode="full", epochs=1, attention_weight=1.0),
                tmp_path / "h.safetensors", progress=False)
