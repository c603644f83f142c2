"""The int scheme, RepQ-style quantizers, LayerNorm folding and block reconstruction."""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from conftest import random_kept_patches
from sparseinv import load_model, sparse_forward, vit_info
from sparseinv.cli import main
from sparseinv.models import timm
from sparseinv.quant import (
    ActQuantizer,
    Log2Quantizer,
    QuantAttention,
    QuantConfig,
    QuantLinear,
    ReconConfig,
    SignedLog2Quantizer,
    calibrate,
    noise_batches,
    quantize_,
    set_quant_mode,
)
from test_sparse_forward import MODELS

calibrate_module = sys.modules["sparseinv.quant.calibrate"]


@pytest.fixture()
def vit():
    torch.manual_seed(0)
    return load_model("test_vit", pretrained=False)


# ---------------------------------------------------------------- quantizers


def test_log2_quantizer_matches_hand_rounding():
    q = Log2Quantizer(bits=4)  # codes 0..15: 1, 2^-0.5, ..., 2^-7.5, then 0
    q.mode = "observe"
    q(torch.tensor([0.2, 1.0]))
    q.finalize()
    assert float(q.scale) == 1.0
    q.mode = "quant"
    x = torch.tensor([1.0, 0.5, 0.6, 0.3, 0.09, 0.0062, 0.005, 0.0])
    # -2 log2(x): 0, 2, 1.47, 3.47, 6.95, 14.7, 15.3, inf
    expected = torch.tensor([1.0, 0.5, 2**-0.5, 2**-1.5, 2**-3.5, 2**-7.5, 2**-7.5, 0.0])
    assert torch.allclose(q(x), expected)
    assert float(q(torch.tensor([0.004]))) == 0.0  # -2 log2 = 15.93: code 16, below the grid


def test_a_3_bit_log2_grid_steps_by_powers_of_two_and_keeps_small_weights():
    q = Log2Quantizer(bits=3)  # codes 0..7: 1, 2^-1, ..., 2^-7, then 0
    q.mode = "observe"
    q(torch.tensor([1.0]))
    q.finalize()
    q.mode = "quant"
    x = torch.tensor([1.0, 0.6, 0.3, 0.02, 0.0078125, 0.005, 0.0])
    # -log2(x): 0, 0.74, 1.74, 5.64, 7, 7.64 (code 8: below the grid)
    expected = torch.tensor([1.0, 0.5, 0.25, 2**-6, 2**-7, 0.0, 0.0])
    assert torch.allclose(q(x), expected)


def test_the_signed_log2_grid_keeps_one_negative_level_zero_and_log_spaced_positives():
    q = SignedLog2Quantizer(bits=3)  # codes: low, 0, then 1, 2^-1, ..., 2^-5
    q.mode = "observe"
    q(torch.tensor([-0.16, 0.3, 1.0]))
    q.finalize()
    assert float(q.scale) == 1.0 and float(q.low) == pytest.approx(-0.16)
    q.mode = "quant"
    x = torch.tensor([-0.17, -0.09, -0.07, 0.0, 0.02, 0.03, 0.3, 0.7, 1.0])
    # below low/2 = -0.08: low; else negatives 0; -log2(x): 5.64 (code 6: below the grid), 5.06, 1.74, 0.51, 0
    expected = torch.tensor([-0.16, -0.16, 0.0, 0.0, 0.0, 2**-5, 0.25, 0.5, 1.0])
    assert torch.allclose(q(x), expected)


def test_recon_takes_the_signed_log2_gelu_grid_below_4_bits_only():
    assert QuantConfig.for_method("recon", 3, 3).gelu_quantizer == "log2"
    assert QuantConfig.for_method("recon", 4, 4).gelu_quantizer == "uniform"
    assert QuantConfig.for_method("repq", 3, 3).gelu_quantizer == "uniform"
    model = load_model("test_vit", pretrained=False)
    quantize_(model, QuantConfig.for_method("recon", 3, 3, recon=None), noise_batches(model, 2, 2), progress=False)
    assert all(isinstance(block.mlp.fc2.input_quant, SignedLog2Quantizer) for block in model.blocks)
    assert not any(isinstance(block.mlp.fc1.input_quant, SignedLog2Quantizer) for block in model.blocks)


def test_log2_quantizer_keeps_small_probabilities_a_uniform_grid_loses():
    torch.manual_seed(0)
    probs = torch.randn(64, 197).mul(2).softmax(dim=-1)
    errors = {}
    for quantizer in (Log2Quantizer(4), ActQuantizer(4)):
        quantizer.mode = "observe"
        quantizer(probs)
        quantizer.finalize()
        quantizer.mode = "quant"
        covered = probs >= 2**-7  # what a 4-bit sqrt(2) grid spans
        errors[quantizer.kind] = float(((quantizer(probs) - probs).abs() / probs)[covered].max())
    assert errors["log2"] < 0.2 and errors["uniform"] > 0.5


def test_pmse_clips_a_lone_outlier_and_keeps_a_clean_range():
    torch.manual_seed(0)
    clean = torch.rand(20000, 1) * 4 - 1
    dirty = clean.clone()
    dirty[0] = 40.0  # far enough to cost resolution, not so far that clipping it costs more
    ranges = {}
    for name, x in (("clean", clean), ("dirty", dirty)):
        q = ActQuantizer(bits=4, calibrator="pmse")
        q.mode = "observe"
        q(x)
        q.finalize()
        ranges[name] = float(q.scale) * 15
    assert ranges["clean"] > 0.99 * float(clean.max() - clean.min())  # at most a mild percentile clipping
    assert ranges["dirty"] < 10  # the outlier is clipped, not served


# ---------------------------------------------------------------- the int scheme


def test_int_scheme_quantizes_every_matrix_product_input(vit):
    quantize_(vit, QuantConfig(4, 4))
    for block in vit.blocks:
        attn = block.attn
        assert isinstance(attn, QuantAttention)
        assert all(isinstance(getattr(attn, n), ActQuantizer) for n in ("q_quant", "k_quant", "v_quant", "attn_quant"))
        assert all(isinstance(m, QuantLinear) for m in (attn.qkv, attn.proj, block.mlp.fc1, block.mlp.fc2))
        assert not hasattr(block, "out_quant")  # the residual stream stays float
    assert isinstance(vit.head, QuantLinear)
    calibrate(vit, noise_batches(vit, 2, 2), progress=False)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(mod)) for m in vit.modules() if isinstance(m, ActQuantizer)]
    with torch.no_grad():
        sparse_forward(vit, torch.randn(1, 3, 160, 160))
    for h in hooks:
        h.remove()
    assert len(seen) == 6 * 8 + 1  # 4 Linear inputs and q, k, softmax, v per block; the head's input


@pytest.mark.parametrize("name, kwargs", MODELS, ids=[f"{n}{k or ''}" for n, k in MODELS])
@pytest.mark.parametrize("method", ["calib", "repq"])
def test_quantized_model_off_equals_timm_and_folding_keeps_it(name, kwargs, method):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, *vit_info(model).input_size)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="AttentionPoolLatent") if kwargs.get("global_pool") == "map" else _no_warning():
        quantize_(model, QuantConfig.for_method(method, 4, 4))
    set_quant_mode(model, "off")
    with torch.no_grad():
        assert torch.allclose(sparse_forward(model, x).logits, expected, atol=1e-5)
    calibrate(model, [(x, None)], progress=False)  # repq folds its LayerNorms here
    set_quant_mode(model, "off")
    with torch.no_grad():
        assert torch.allclose(sparse_forward(model, x).logits, expected, atol=1e-5 * max(1.0, float(expected.abs().max())))


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_folding_gives_per_tensor_scales_and_the_per_channel_result(vit, monkeypatch):
    x = torch.randn(4, 3, 160, 160)
    config = QuantConfig(4, 4, ln_reparam=True, weight_calibrator="mse")
    unfolded, folded = (quantize_(copy.deepcopy(vit), config) for _ in range(2))
    monkeypatch.setattr(calibrate_module, "fold_layernorms", lambda model: 0)
    calibrate(unfolded, [(x, None)], progress=False)
    monkeypatch.undo()
    calibrate(folded, [(x, None)], progress=False)
    for name in ("blocks.0.attn.qkv", "blocks.3.mlp.fc1", "head"):
        before, after = unfolded.get_submodule(name).input_quant, folded.get_submodule(name).input_quant
        assert before.per_channel and before.scale.numel() == 64
        assert not after.per_channel and after.scale.numel() == 1
    # Weights in float: the folded per-tensor activations are the per-channel ones, re-expressed.
    for model in (unfolded, folded):
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.mode = "off"
    with torch.no_grad():
        a, b = sparse_forward(unfolded, x).logits, sparse_forward(folded, x).logits
        ref = sparse_forward(vit, x).logits
    assert (a - b).abs().max() < 1e-3 * ref.abs().max()
    assert (a - ref).abs().max() > 100 * (a - b).abs().max()  # and quantization did something


def _quantizer_inputs(model, x, quantizers) -> list[torch.Tensor]:
    fed = {}
    hooks = [q.register_forward_pre_hook(lambda m, args, i=i: fed.__setitem__(i, args[0].detach().clone()))
             for i, q in enumerate(quantizers)]
    with torch.no_grad():
        sparse_forward(model, x)
    for h in hooks:
        h.remove()
    return [fed[i] for i in range(len(quantizers))]


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_calibration_fits_ranges_to_quantized_inputs(vit, sequential):
    """Every min/max range is the range of what its quantizer is fed: the full-precision
    activations (one pass), or, sequentially, the outputs of the already quantized layers."""
    from sparseinv.quant.quantizers import act_qparams

    x = torch.randn(4, 3, 160, 160)
    model = quantize_(copy.deepcopy(vit), QuantConfig(3, 3, sequential=sequential))
    calibrate(model, [(x[:2], None), (x[2:], None)], progress=False)
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    quantized_inputs = _quantizer_inputs(model, x, quantizers)
    set_quant_mode(model, "off")
    full_precision_inputs = _quantizer_inputs(model, x, quantizers)
    expected = quantized_inputs if sequential else full_precision_inputs
    for q, inputs in zip(quantizers, expected):
        scale, _ = act_qparams(inputs.amin(), inputs.amax(), q.bits)
        assert torch.allclose(q.scale.flatten(), scale.flatten(), rtol=1e-5)
    # The two kinds of input really differ after the first quantizer, so the check above can tell them apart.
    assert any(not torch.allclose(a, b) for a, b in zip(quantized_inputs[1:], full_precision_inputs[1:]))


# ---------------------------------------------------------------- reconstruction


def test_reconstruction_lowers_every_block_error(vit):
    config = QuantConfig.for_method("recon", 4, 4, recon=ReconConfig(iters=60, batch_size=4))
    model = quantize_(copy.deepcopy(vit), config, noise_batches(vit, 8, 8), progress=False)
    report = model.recon_report
    assert [r["unit"] for r in report] == [f"block {i}" for i in range(6)] + ["head"]
    assert all(r["loss_after"] < r["loss_before"] for r in report)
    # Every weight ends with fixed integer codes; some differ from rounding to nearest.
    changed = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert m.round_logits is None and m.w_int.dtype == torch.int8
            nearest = torch.round(m.linear.weight / m.w_scale[:, None]).clamp(-7, 7)
            changed += int((m.w_int != nearest).sum())
    assert changed > 0


def test_reconstruction_learns_every_activation_step_size(vit):
    """LSQ inside reconstruction moves each uniform activation step size from its calibrated value, by at
    most what Adam's steps on the log scale allow; with its learning rate at 0 none moves."""
    batches = noise_batches(vit, 8, 4)
    base = QuantConfig.for_method("calib", 4, 4)
    recon = ReconConfig(iters=10, batch_size=4, lr_scale=1e-2)

    def steps(config):
        model = quantize_(copy.deepcopy(vit), config, batches, progress=False)
        return {n: m.scale.clone() for n, m in model.named_modules() if isinstance(m, ActQuantizer)}

    calibrated, learned, fixed = steps(base), steps(replace(base, recon=recon)), steps(replace(base, recon=replace(recon, lr_scale=0.0)))
    assert len(calibrated) == 6 * 8 + 1  # q, k, v, softmax and the inputs of qkv, proj, fc1, fc2 per block; the head's input
    for name, scale in calibrated.items():
        assert torch.allclose(fixed[name], scale, rtol=1e-6, atol=0), name  # lr 0: the calibrated step (up to exp(log s))
        moved = (learned[name] / scale).log().abs().max().item()
        assert 1e-4 < moved <= 3 * recon.iters * recon.lr_scale, (name, moved)


def test_reconstruction_feeds_kept_tokens_only(vit):
    x, keep, mask = random_kept_patches(30)
    config = QuantConfig.for_method("recon", 4, 4, recon=ReconConfig(iters=5, batch_size=2))
    token_counts = []
    results = []
    for fill in (1e4, 0.0):
        images = torch.where(mask, torch.full_like(x, fill), x)
        model = copy.deepcopy(vit)
        model.blocks[0].register_forward_pre_hook(lambda m, args: token_counts.append(args[0].shape[1]))
        quantize_(model, config, [(images, keep)], progress=False)
        results.append({n: b.clone() for n, b in model.named_buffers() if n.endswith(("w_int", "scale"))})
    assert set(token_counts) == {1 + 30}
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("args, needle", [
    (["--method", "repq", "--recon-iters", "5"], "need --method recon"),
    (["--method", "psaq", "--ln-reparam"], "need --scheme int"),
    (["--method", "psaq", "--softmax-quantizer", "log2"], "need --scheme int"),
    (["--method", "calib", "--channelwise-ln"], "psaq scheme"),
    (["--recon-iters", "0"], "at least 1"),
    (["--recon-drop", "1.5"], "[0, 1)"),
])
def test_cli_refuses_settings_a_method_cannot_honour(tmp_path, capsys, args, needle):
    out = tmp_path / "q.safetensors"
    code = main(["quantize", "--model", "test_vit", "--random-weights", "--calib", "noise", *args, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_cli_refuses_a_quantized_file_of_an_older_format(tmp_path, capsys):
    from safetensors.torch import save_file

    old = tmp_path / "old.safetensors"
    save_file({"x": torch.zeros(1)}, str(old), metadata={"format": "sparseinv-quant/1"})
    data = tmp_path / "data" / "n01440764"
    data.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (170, 170)).save(data / "0.png")
    code = main(["evaluate", "--model", "test_vit", "--random-weights", "--quantized", str(old), "--data", str(tmp_path / "data")])
    assert code == 2
    assert "older format" in capsys.readouterr().err


def test_reconstruction_views_feed_remapped_kept_tokens(vit, monkeypatch):
    reconstruct_module = sys.modules["sparseinv.quant.reconstruct"]
    fed = []
    real_input_tokens = reconstruct_module.input_tokens

    def spy(model, x, keep=None):
        fed.append((x.clone(), keep.clone()))
        return real_input_tokens(model, x, keep)

    monkeypatch.setattr(reconstruct_module, "input_tokens", spy)
    x = torch.randn(2, 3, 160, 160)
    keep = torch.tensor([[0, 1, 2, 55], [10, 20, 30, 99]])
    config = QuantConfig.for_method("recon", 4, 4, recon=ReconConfig(iters=2, batch_size=2, views=3))
    quantize_(vit, config, [(x, keep)], progress=False)
    images = [f[0] for f in fed[: len(fed) // 2]]  # full-precision pass; the quantized pass repeats them
    assert len(images) == 3 and torch.equal(images[0], x)
    view = reconstruct_module.whole_patch_views(3, (16, 16), config.recon.seed)[1]
    assert torch.equal(images[1], view.apply(x))
    assert torch.equal(fed[1][1], view.remap(keep, (10, 10), (16, 16)))
