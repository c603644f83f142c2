"""The one sparse forward: equivalence with model(x), the published reference, refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import TESTVECTORS
from sparseinv import UsageError, load_model, sparse_forward, vit_info
from sparseinv.models import timm

MODELS = [
    ("test_vit", {}),  # class-token pooling
    ("test_vit", {"global_pool": "avg"}),  # average pooling over tokens
    ("test_vit", {"reg_tokens": 2}),  # register tokens: three prefix tokens
    ("test_vit", {"global_pool": "map"}),  # attention pooling head
    ("deit_tiny_distilled_patch16_224", {}),  # distillation token, two heads
    ("vit_small_patch16_224", {"depth": 2, "init_values": 1e-5}),  # LayerScale
]


@pytest.mark.parametrize("name, kwargs", MODELS, ids=[f"{n}{k or ''}" for n, k in MODELS])
def test_all_tokens_give_model_logits(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    info = vit_info(model)
    x = torch.randn(2, *info.input_size)
    keep = torch.arange(info.num_patches).expand(2, -1)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(sparse_forward(model, x).logits, expected, atol=1e-5)
        assert torch.allclose(sparse_forward(model, x, keep).logits, expected, atol=1e-5)


def test_real_deit_tiny_all_tokens_equal_model(deit_tiny):
    x = load_file(str(TESTVECTORS))["x"][:2]
    keep = torch.arange(196).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(sparse_forward(deit_tiny, x, keep).logits, deit_tiny(x), atol=1e-5)


def test_matches_published_reference(deit_tiny):
    ref = load_file(str(TESTVECTORS))
    with torch.no_grad():
        dense = sparse_forward(deit_tiny, ref["x"], return_cls_attn=True)
        sparse = sparse_forward(deit_tiny, ref["x"], ref["kept_patches"], return_cls_attn=True)
    assert torch.allclose(dense.logits, ref["logits_dense"], atol=1e-4)
    assert torch.allclose(dense.cls_attn, ref["cls_attn_dense"], atol=1e-4)
    assert torch.allclose(sparse.logits, ref["logits_sparse"], atol=1e-4)
    assert torch.allclose(sparse.cls_attn, ref["cls_attn_sparse"], atol=1e-4)


def test_cls_attention_is_a_distribution_over_tokens(tiny_vit):
    x = torch.randn(3, 3, 160, 160)
    keep = torch.tensor([[0, 5, 7, 99]] * 3)
    with torch.no_grad():
        out = sparse_forward(tiny_vit, x, keep, return_cls_attn=True)
    assert out.cls_attn.shape == (3, 4)
    # CLS attends to itself too, so the patch share is positive and below one.
    total = out.cls_attn.sum(dim=1)
    assert torch.all(total > 0) and torch.all(total < 1)


def test_sparse_forward_depends_only_on_kept_patches(tiny_vit):
    x = torch.randn(1, 3, 160, 160)
    keep = torch.tensor([[0, 1, 10, 11]])  # the 2x2 top-left block of patches
    y = x.clone()
    y[:, :, 32:, 32:] = 100.0  # everything outside the kept patches changes
    with torch.no_grad():
        a = sparse_forward(tiny_vit, x, keep).logits
        b = sparse_forward(tiny_vit, y, keep).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_recording_attention_leaves_model_as_it_was(tiny_vit):
    attn = tiny_vit.blocks[-1].attn
    fused_before = attn.fused_attn
    with torch.no_grad():
        sparse_forward(tiny_vit, torch.randn(1, 3, 160, 160), return_cls_attn=True)
    assert attn.fused_attn == fused_before
    assert not attn.attn_drop._forward_hooks


def test_gradients_reach_only_kept_patches(tiny_vit):
    x = torch.randn(1, 3, 160, 160, requires_grad=True)
    keep = torch.tensor([[3, 42]])
    sparse_forward(tiny_vit, x, keep).logits.sum().backward()
    per_patch = x.grad.abs().sum(1)[0].unflatten(0, (10, 16)).unflatten(2, (10, 16)).sum((1, 3)).flatten()
    assert set(torch.nonzero(per_patch).flatten().tolist()) == {3, 42}


def test_refuses_model_without_class_token():
    model = timm.create_model("test_vit", class_token=False, global_pool="avg")
    with pytest.raises(UsageError, match="no class token"):
        vit_info(model)


def test_refuses_cnn():
    with pytest.raises(UsageError, match="not a token-sequence ViT"):
        vit_info(timm.create_model("resnet18"))
