"""The one sparse forward: equivalence with model(x), the published reference, refusals."""

from __future__ import annotations

import sys

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


# Beside MODELS, embeddings the pixel-gradient path must respect: no class token in the
# positional embedding (DeiT-3 style), a LayerNorm on each patch embedding, and CLIP's
# pre-norm after the embedding.
GRADIENT_MODELS = [*MODELS, ("test_vit", {"no_embed_class": True}), ("test_vit", {"embed_norm_layer": torch.nn.LayerNorm}),
                   ("vit_base_patch16_clip_224", {"depth": 1, "embed_dim": 48, "num_heads": 2})]


@pytest.mark.parametrize("name, kwargs", GRADIENT_MODELS, ids=[f"{n}{k or ''}" for n, k in GRADIENT_MODELS])
@pytest.mark.parametrize("sparse", [False, True], ids=["all", "kept"])
def test_pixel_gradient_path_equals_the_convolution(name, kwargs, sparse):
    """Inversion's forward (frozen model, pixels that want a gradient) takes the per-patch
    gradient path: the same logits, and the gradient of the patch convolution."""
    sf = sys.modules["sparseinv.vit.forward"]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval().requires_grad_(False)
    info = vit_info(model)
    assert sf._patch_projection(model) is not None
    x = torch.randn(2, *info.input_size, requires_grad=True)
    keep = torch.stack([torch.randperm(info.num_patches)[: info.num_patches // 3].sort().values for _ in range(2)]) if sparse else None
    weights = torch.randn(model.num_classes)
    logits = sparse_forward(model, x, keep).logits
    (grad,) = torch.autograd.grad((logits * weights).sum(), x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sf, "_patch_projection", lambda model: None)  # the plain path: convolution over the whole image
        plain = sparse_forward(model, x, keep).logits
        (expected,) = torch.autograd.grad((plain * weights).sum(), x)
    assert torch.equal(logits, plain)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


def test_trainable_models_take_the_plain_path(tiny_vit):
    """Distillation trains the patch and positional embeddings: they must get their gradients."""
    model = timm.create_model("test_vit").train()
    x = torch.randn(2, 3, 160, 160, requires_grad=True)
    sparse_forward(model, x, torch.arange(10).expand(2, -1)).logits.sum().backward()
    assert model.pos_embed.grad is not None and model.patch_embed.proj.weight.grad is not None
