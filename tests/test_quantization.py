"""Quantization: the arithmetic, calibrators, sparse-aware calibration, save/reload, the CLI's refusals."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import DEIT_TINY_CKPT, VAL, random_kept_patches
from sparseinv import InversionConfig, PruneSchedule, invert, load_model, read_pool, sparse_forward
from sparseinv.cli import main
from sparseinv.data import ImageFolder, evaluate, read_class_index
from sparseinv.models import timm
from sparseinv.quant import (
    ActQuantizer,
    QuantAttention,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    ReconConfig,
    calibrate,
    calibration_batches,
    fake_quant_weight,
    fingerprint,
    load_quantized,
    noise_batches,
    quantize_,
    save_quantized,
    set_quant_mode,
    weight_scale,
)


# ---------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quantization_matches_hand_written_reference(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 10) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.5])[:, None]
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scale(w, bits)
    ref_scale = w.abs().amax(dim=1) / qmax  # symmetric per output channel, min/max
    assert torch.allclose(scale, ref_scale)
    ref = torch.clamp(torch.round(w / ref_scale[:, None]), -qmax, qmax) * ref_scale[:, None]
    out = fake_quant_weight(w, scale, bits)
    assert torch.allclose(out, ref, atol=1e-6)
    # Every row uses at most 2 * qmax + 1 levels, and its largest magnitude is exact.
    for row, s in zip(out, scale):
        assert len(torch.unique(torch.round(row / s))) <= 2 * qmax + 1
    assert torch.allclose(out.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-5)


def test_activation_minmax_over_all_batches_and_reference_rounding():
    q = ActQuantizer(bits=4)
    q.mode = "observe"
    a, b = torch.tensor([[-1.0, 0.5]]), torch.tensor([[2.0, 0.25], [0.1, -0.3]])
    assert torch.equal(q(a), a)  # observing changes nothing
    q(b)
    q.finalize()
    scale = (2.0 - (-1.0)) / 15
    zero_point = round(1.0 / scale)
    assert torch.allclose(q.scale, torch.tensor([scale]))
    assert int(q.zero_point) == zero_point
    q.mode = "quant"
    x = torch.tensor([-5.0, -1.0, -0.33, 0.0, 0.41, 1.9, 2.0, 7.0])
    ref = (torch.clamp(torch.round(x / scale) + zero_point, 0, 15) - zero_point) * scale
    assert torch.allclose(q(x), ref, atol=1e-6)
    assert float(q(torch.tensor([7.0]))) == pytest.approx((15 - zero_point) * scale)  # clamped, not wrapped


def test_percentile_and_mse_clip_heavy_tails_that_minmax_keeps():
    torch.manual_seed(0)
    x = torch.randn(20000, 1) ** 3  # heavy tails, like post-GELU and residual activations
    x[0] = 1000.0  # one outlier: percentile ignores it
    ranges, errors = {}, {}
    for calibrator in ("minmax", "percentile", "mse"):
        q = ActQuantizer(bits=4, calibrator=calibrator)
        q.mode = "observe"
        q(x)
        q.finalize()
        ranges[calibrator] = float(q.scale) * 15
        q.mode = "quant"
        errors[calibrator] = float((q(x) - x).pow(2).sum())
    assert ranges["minmax"] == pytest.approx(1000 - float(x.min()), rel=1e-4)
    assert ranges["percentile"] < 0.2 * ranges["minmax"]
    assert ranges["mse"] < ranges["minmax"]
    assert errors["mse"] < errors["minmax"]


def test_mse_weight_scale_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(16, 1024)  # max is ~3.3 sigma; 4-bit MSE clips near 2.5 sigma
    for bits in (2, 4, 8):
        err = {c: (fake_quant_weight(w, weight_scale(w, bits, c), bits) - w).pow(2).sum(dim=1) for c in ("minmax", "mse")}
        assert (err["mse"] <= err["minmax"] + 1e-6).all()
        if bits == 4:
            assert err["mse"].sum() < 0.9 * err["minmax"].sum()


def test_per_channel_activation_ranges():
    q = ActQuantizer(bits=8, per_channel=True)
    q.mode = "observe"
    x = torch.randn(4, 9, 3) * torch.tensor([0.1, 1.0, 50.0])
    q(x)
    q.finalize()
    assert q.scale.shape == (3,)
    ref = (x.amax(dim=(0, 1)).clamp(min=0) - x.amin(dim=(0, 1)).clamp(max=0)) / 255
    assert torch.allclose(q.scale, ref)


def test_config_refuses_bits_out_of_range():
    from sparseinv import UsageError

    for w, a in ((1, 8), (9, 8), (8, 1), (8, 16)):
        with pytest.raises(UsageError):
            QuantConfig(w, a).validate()
    for bits in range(2, 9):
        QuantConfig(bits, bits).validate()


# ---------------------------------------------------------------- the model


@pytest.fixture()
def vit():
    torch.manual_seed(0)
    return load_model("test_vit", pretrained=False)


def reference_logits(vit, x, bits, ranges=None, scheme="int"):
    """A timm ViT's forward (class token, pre-norm blocks) written out from its parameters,
    independently of sparseinv.quant.

    Without ``ranges`` it runs in full precision and returns the min/max it saw at every
    point ``scheme`` quantizes; with them, each such tensor is fake-quantized asymmetric per
    tensor over its range widened to 0 (the min/max calibrator) and every weight symmetric
    per output channel over its abs-max. ``int``: every matrix-product input (Linear inputs,
    q, k, v, the softmax output); ``psaq``: every Linear input, the embeddings, the
    pre-softmax scores, the ``attn @ v`` product and every block output.
    """
    observed = {}
    qmax_a, qmax_w = 2**bits - 1, 2 ** (bits - 1) - 1

    def act(name, t, schemes=("int", "psaq")):
        if scheme not in schemes:
            return t
        if ranges is None:
            lo, hi = t.min(), t.max()
            observed[name] = (torch.minimum(observed[name][0], lo), torch.maximum(observed[name][1], hi)) if name in observed else (lo, hi)
            return t
        lo, hi = min(float(ranges[name][0]), 0.0), max(float(ranges[name][1]), 0.0)
        scale = (hi - lo) / qmax_a
        zero = round(-lo / scale)
        return (torch.clamp(torch.round(t / scale) + zero, 0, qmax_a) - zero) * scale

    def weight(w):
        if ranges is None:
            return w
        s = w.abs().reshape(w.shape[0], -1).amax(1).view(-1, *[1] * (w.dim() - 1)) / qmax_w
        return torch.clamp(torch.round(w / s), -qmax_w, qmax_w) * s

    def linear(name, module, t):
        return torch.nn.functional.linear(act(name, t), weight(module.weight), module.bias)

    B, conv = x.shape[0], vit.patch_embed.proj
    t = torch.nn.functional.conv2d(x, weight(conv.weight), conv.bias, stride=conv.stride)
    t = act("embed", torch.cat([vit.cls_token.expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1) + vit.pos_embed, ("psaq",))
    for i, block in enumerate(vit.blocks):
        attn = block.attn
        h = linear(f"{i}.qkv", attn.qkv, block.norm1(t))
        q, k, v = h.reshape(B, h.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = act(f"{i}.q", q, ("int",)), act(f"{i}.k", k, ("int",)), act(f"{i}.v", v, ("int",))
        scores = act(f"{i}.scores", (q * attn.scale) @ k.transpose(-2, -1), ("psaq",))
        mixed = act(f"{i}.av", act(f"{i}.softmax", scores.softmax(-1), ("int",)) @ v, ("psaq",))
        t = t + linear(f"{i}.proj", attn.proj, mixed.transpose(1, 2).reshape(B, h.shape[1], -1))
        t = t + linear(f"{i}.fc2", block.mlp.fc2, torch.nn.functional.gelu(linear(f"{i}.fc1", block.mlp.fc1, block.norm2(t))))
        t = act(f"{i}.out", t, ("psaq",))
    return linear("head", vit.head, vit.norm(t)[:, 0]), observed


def reference_ranges(vit, batches, bits, scheme="int"):
    """What min/max calibration on ``batches`` (dense) sees at every quantized point, by :func:`reference_logits`."""
    ranges = {}
    with torch.no_grad():
        for images, _ in batches:
            for name, (lo, hi) in reference_logits(vit, images, bits, scheme=scheme)[1].items():
                ranges[name] = (torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)) if name in ranges else (lo, hi)
    return ranges


def test_quantize_wraps_everything_and_off_is_exactly_full_precision(vit):
    x = torch.randn(2, 3, 160, 160)
    calibration = noise_batches(vit, 4, 2)
    with torch.no_grad():
        ref = vit(x)
        assert torch.allclose(reference_logits(vit, x, 4)[0], ref, atol=1e-5)  # the written-out forward is test_vit's
        expected = reference_logits(vit, x, 4, reference_ranges(vit, calibration, 4))[0]
    quantize_(vit, QuantConfig(4, 4))
    linears = [n for n, m in vit.named_modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 6 * 4 + 1  # qkv, proj, fc1, fc2 per block, and the head
    assert all(isinstance(vit.get_submodule(n.rpartition(".")[0]), QuantLinear) for n in linears)
    assert isinstance(vit.patch_embed.proj, QuantConv2d)
    assert all(isinstance(b.attn, QuantAttention) for b in vit.blocks)
    assert isinstance(vit.blocks[0].attn.qkv, QuantLinear)
    with torch.no_grad():
        # Mode "off" is full precision (up to fused vs. explicit attention rounding).
        assert torch.allclose(sparse_forward(vit, x).logits, ref, atol=1e-5)
        calibrate(vit, calibration, progress=False)
        quantized = sparse_forward(vit, x).logits
    # W4/A4 moves the logits by about half their range; the library's fake quantization is the
    # written-out one up to summation order (a scale or zero point off anywhere moves it by far more).
    assert (quantized - ref).abs().max() > 0.2 * ref.abs().max()
    assert (quantized - expected).abs().max() < 0.01 * ref.abs().max()


def test_w8a8_stays_close_on_random_vit_per_layer(vit):
    """Each quantizer alone barely moves a random ViT's logits at 8 bits."""
    x = torch.randn(4, 3, 160, 160)
    with torch.no_grad():
        ref = vit(x)
    quantize_(vit, QuantConfig(8, 8, scheme="psaq"))
    calibrate(vit, [(x, None)], progress=False)
    with torch.no_grad():
        set_quant_mode(vit, "off")
        vit.blocks[2].attn.qkv.mode = "quant"
        vit.blocks[2].attn.qkv.input_quant.mode = "quant"
        vit.blocks[2].attn.score_quant.mode = "quant"
        out = sparse_forward(vit, x).logits
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_sparse_calibration_never_sees_dropped_patches(vit):
    x, keep, mask = random_kept_patches(40)
    huge = torch.where(mask, torch.full_like(x, 1e4), x)
    black = torch.where(mask, torch.zeros_like(x), x)

    def scales(images, kept):
        model = quantize_(copy.deepcopy(vit), QuantConfig(8, 8, scheme="psaq"))
        calibrate(model, [(images, kept)], progress=False)
        return {name: m.scale.clone() for name, m in model.named_modules() if isinstance(m, ActQuantizer)}

    sparse_huge, sparse_black, dense_huge = scales(huge, keep), scales(black, keep), scales(huge, None)
    for name in sparse_huge:
        assert torch.equal(sparse_huge[name], sparse_black[name]), name
    assert (dense_huge["embed_quant"] > 100 * sparse_huge["embed_quant"]).all()


def test_pool_batches_feed_kept_patches(tmp_path, vit):
    config = InversionConfig(num_images=3, batch_size=3, iterations=4, schedule=PruneSchedule((1, 2), (0.3, 0.3)))
    invert(vit, config, out=str(tmp_path / "pool"), model_name="test_vit", progress=False)
    batches = calibration_batches(vit, str(tmp_path / "pool"), "test_vit", num=32, batch_size=2)
    assert [b[0].shape[0] for b in batches] == [2, 1]
    pool = read_pool(tmp_path / "pool")
    assert all(torch.equal(keep, pool.kept_patches[i : i + 2]) for (_, keep), i in zip(batches, (0, 2)))
    # Pixels were normalised with test_vit's own mean and std, 0.5 and 0.5 per channel (ImageNet's differ).
    assert vit.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and vit.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    fed = torch.cat([images for images, _ in batches])
    assert torch.allclose(fed, (pool.images - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("config", [
    QuantConfig(4, 6, scheme="psaq", calibrator="mse", channelwise_ln=True),
    QuantConfig.for_method("recon", 4, 4, recon=ReconConfig(iters=30, batch_size=2)),  # learned codes, scales and folds
    QuantConfig.for_method("recon", 3, 3, recon=ReconConfig(iters=10, batch_size=2)),  # the signed log2 grid's low level
], ids=["psaq-channelwise", "recon", "recon-w3a3"])
def test_save_and_reload_give_identical_logits(tmp_path, vit, config):
    state = copy.deepcopy(vit.state_dict())
    fp = fingerprint(vit)
    quantize_(vit, config, noise_batches(vit, 4, 2), progress=False)
    x = torch.randn(3, 3, 160, 160)
    keep = torch.arange(0, 100, 2).expand(3, -1)
    with torch.no_grad():
        before = [sparse_forward(vit, x).logits, sparse_forward(vit, x, keep).logits]
    save_quantized(vit, tmp_path / "q.safetensors", "test_vit", fp)
    fresh = load_model("test_vit", pretrained=False)
    fresh.load_state_dict(state)
    load_quantized(fresh, tmp_path / "q.safetensors", "test_vit")
    assert fresh.quantization.config == vit.quantization.config
    with torch.no_grad():
        after = [sparse_forward(fresh, x).logits, sparse_forward(fresh, x, keep).logits]
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        set_quant_mode(fresh, "off")  # re-applied LayerNorm folds leave full precision intact
        original = load_model("test_vit", pretrained=False)
        original.load_state_dict(state)
        assert torch.allclose(sparse_forward(fresh, x).logits, sparse_forward(original, x).logits, atol=1e-5)


def _library_name(point: str) -> str:
    """The quantizer :func:`quantize_` puts at a point named by :func:`reference_logits` (psaq scheme)."""
    if point in ("embed", "head"):
        return {"embed": "embed_quant", "head": "head.input_quant"}[point]
    block, what = point.split(".")
    return f"blocks.{block}." + {"qkv": "attn.qkv.input_quant", "proj": "attn.proj.input_quant", "scores": "attn.score_quant",
                                 "av": "attn.av_quant", "fc1": "mlp.fc1.input_quant", "fc2": "mlp.fc2.input_quant", "out": "out_quant"}[what]


@pytest.mark.parametrize("method", ["psaq", "repq"])
def test_real_deit_tiny_w8a8_is_close_to_full_precision(deit_tiny, method):
    batches = calibration_batches(deit_tiny, str(VAL), "deit_tiny_patch16_224", num=8)
    x = batches[0][0]
    with torch.no_grad():
        ref = sparse_forward(deit_tiny, x).logits
    config = QuantConfig.for_method(method, 8, 8)
    model = quantize_(copy.deepcopy(deit_tiny), config, batches, progress=False)
    with torch.no_grad():
        out = sparse_forward(model, x).logits
    # Which class wins a near-tie depends on the machine's kernels: compare top classes only
    # where full precision is clearly decided, and bound the logit error everywhere.
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    assert clear.sum() >= 4
    assert torch.equal(out.argmax(1)[clear], ref.argmax(1)[clear])
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.95
    assert (out - ref).abs().max() < 0.25 * ref.abs().max()
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, ActQuantizer)}
    if method == "psaq":
        # Every range is the min/max full precision shows at its point on these images (written out
        # independently): 8-bit steps, zero points exact. A step or zero point off by one code changes
        # the logits less than the rounding noise of 8-bit DeiT-Tiny does, so they are checked here.
        ranges = reference_ranges(deit_tiny, batches, 8, "psaq")
        assert len(ranges) == len(quantizers) == 12 * 7 + 2
        for point, (lo, hi) in ranges.items():
            lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
            q = quantizers[_library_name(point)]
            assert float(q.scale) == pytest.approx((hi - lo) / 255, rel=1e-5), point
            assert int(q.zero_point) == round(-lo / ((hi - lo) / 255)), point
    else:
        # RepQ's pmse calibrator clips the long post-GELU tail that min/max keeps whole: the same
        # method with min/max calibrators ends each fc2 input's range 5-45% higher on these images.
        minmax = quantize_(copy.deepcopy(deit_tiny), replace(config, calibrator="minmax", gelu_calibrator="minmax"), batches,
                           progress=False)

        def top(q):
            return float((255 - q.zero_point.float()) * q.scale)

        clipped = [top(b.mlp.fc2.input_quant) < 0.97 * top(o.mlp.fc2.input_quant) for b, o in zip(model.blocks, minmax.blocks)]
        assert sum(clipped) >= 10, clipped


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """test_vit checkpoints (two different ones), a small labelled folder, a pool from test_vit."""
    root = tmp_path_factory.mktemp("quant_cli")
    paths = {}
    for seed, name in ((0, "ckpt"), (1, "other_ckpt")):
        torch.manual_seed(seed)
        model = timm.create_model("test_vit")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"{name}.safetensors"))
        paths[name] = str(root / f"{name}.safetensors")
    rng = np.random.default_rng(0)
    for cls in ("n01440764", "n01443537"):  # ImageNet synsets: evaluate maps them to classes 0 and 1
        (root / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (180, 170, 3), dtype=np.uint8)).save(root / "data" / cls / f"{i}.png")
    model = load_model("test_vit", paths["ckpt"])
    config = InversionConfig(num_images=2, batch_size=2, iterations=3, schedule=PruneSchedule((1,), (0.3,)))
    invert(model, config, out=str(root / "pool"), model_name="test_vit", progress=False)
    paths.update(root=root, data=str(root / "data"), pool=str(root / "pool"))
    return paths


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_cli_quantize_then_evaluate_gives_the_in_memory_accuracy(cli_files, tmp_path, capsys):
    out, report = tmp_path / "q.safetensors", tmp_path / "eval.json"
    base = ["--model", "test_vit", "--checkpoint", cli_files["ckpt"]]
    assert main(["quantize", *base, "--calib", cli_files["pool"], "--w-bits", "4", "--a-bits", "8", "--method", "calib",
                 "--calibrator", "percentile", "--out", str(out), "--quiet"]) == 0
    assert "sparse calibration" in capsys.readouterr().out
    assert main(["evaluate", *base, "--quantized", str(out), "--data", cli_files["data"], "--json", str(report), "--quiet"]) == 0
    record = json.loads(report.read_text())
    assert record["num_images"] == 6 and record["quant_config"]["w_bits"] == 4
    model = load_model("test_vit", cli_files["ckpt"])
    quantize_(model, QuantConfig.for_method("calib", 4, 8, calibrator="percentile"), calibration_batches(model, cli_files["pool"], "test_vit"), progress=False)
    expected = evaluate(model, ImageFolder.scan(cli_files["data"]), progress=False)
    assert record["top1"] == expected["top1"] and record["top5"] == expected["top5"]


@pytest.mark.parametrize("bits", [["--w-bits", "9"], ["--w-bits", "1"], ["--a-bits", "0"], ["--a-bits", "16"]])
def test_cli_refuses_bits_out_of_range(cli_files, tmp_path, capsys, bits):
    args = ["quantize", "--model", "test_vit", "--checkpoint", cli_files["ckpt"], "--calib", "noise", *bits, "--out", str(tmp_path / "q.st")]
    assert main(args) == 2
    _one_line_error(capsys, bits[0], "2 to 8")
    assert not (tmp_path / "q.st").exists()


def test_cli_refuses_a_pool_from_another_model(cli_files, tmp_path, capsys):
    args = ["quantize", "--model", "deit_tiny_patch16_224", "--checkpoint", str(DEIT_TINY_CKPT), "--calib", cli_files["pool"],
            "--out", str(tmp_path / "q.st")]
    assert main(args) == 2
    _one_line_error(capsys, "inverted from test_vit")


def test_cli_refuses_a_calibration_folder_without_images(cli_files, tmp_path, capsys):
    (tmp_path / "empty" / "somecls").mkdir(parents=True)
    args = ["quantize", "--model", "test_vit", "--checkpoint", cli_files["ckpt"], "--calib", str(tmp_path / "empty"), "--out", str(tmp_path / "q.st")]
    assert main(args) == 2
    _one_line_error(capsys, "no images")


@pytest.fixture(scope="module")
def quantized_file(cli_files):
    out = cli_files["root"] / "noise.safetensors"
    assert main(["quantize", "--model", "test_vit", "--checkpoint", cli_files["ckpt"], "--calib", "noise", "--calib-num-images", "4",
                 "--recon-iters", "3", "--out", str(out), "--quiet"]) == 0
    return str(out)


@pytest.mark.parametrize("model, ckpt, needle", [
    ("test_vit", "other_ckpt", "does not match the weights"),
    ("deit_tiny_patch16_224", "deit", "made for test_vit"),
])
def test_cli_refuses_a_quantized_file_for_another_model(cli_files, quantized_file, capsys, model, ckpt, needle):
    capsys.readouterr()
    weights = ["--checkpoint", str(DEIT_TINY_CKPT) if ckpt == "deit" else cli_files[ckpt]]
    args = ["evaluate", "--model", model, *weights, "--quantized", quantized_file, "--data", cli_files["data"], "--quiet"]
    assert main(args) == 2
    _one_line_error(capsys, needle)


def test_cli_refuses_a_file_that_is_not_a_quantized_model(cli_files, capsys):
    args = ["evaluate", "--model", "test_vit", "--checkpoint", cli_files["ckpt"], "--quantized", cli_files["ckpt"], "--data", cli_files["data"]]
    assert main(args) == 2
    _one_line_error(capsys, "not a sparseinv quantized model")


def test_cli_refuses_classes_missing_from_the_class_map(cli_files, capsys, tmp_path):
    class_map = tmp_path / "classes.txt"
    class_map.write_text("n01440764\n")  # the fixture's second folder, n01443537, is missing
    args = ["evaluate", "--model", "test_vit", "--checkpoint", cli_files["ckpt"], "--data", cli_files["data"], "--class-map", str(class_map)]
    assert main(args) == 2
    _one_line_error(capsys, "not in the class map")
