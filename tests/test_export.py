"""Integer ONNX export: ONNX Runtime agrees with our fake-quantized model; bad input is refused."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

from conftest import DEIT_TINY_CKPT, SYNSETS, VAL
from sparseinv import load_model, sparse_forward
from sparseinv.cli import main
from sparseinv.data import ImageFolder, read_class_index, transform_folder
from sparseinv.quant.export import INTEGER_OPS, _exporting, export_onnx, integer_ops, onnx_logits, onnx_session
from sparseinv.models import timm
from sparseinv.quant import Log2Quantizer, QuantConfig, load_quantized, noise_batches, quantize_, save_quantized

# ONNX Runtime rounds at a few ties differently and sums in another order; a wrong scale
# or zero point moves the logits by far more (checked below by corrupting one scale).
TOLERANCE = 0.05


def _agreement(reference: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def quantized_vit():
    torch.manual_seed(0)
    model = load_model("test_vit", pretrained=False)
    qmodel = quantize_(copy.deepcopy(model), QuantConfig.for_method("calib", 8, 8), noise_batches(model, 8, 8), progress=False)
    return model, qmodel


def test_integer_export_agrees_with_fake_quantization(tmp_path, quantized_vit):
    _, qmodel = quantized_vit
    path = tmp_path / "q.onnx"
    assert export_onnx(qmodel, path) == []
    torch.manual_seed(1)
    x = torch.randn(6, 3, 160, 160)
    with torch.no_grad():
        reference = sparse_forward(qmodel, x).logits
    session = onnx_session(path)
    got = onnx_logits(session, x, batch_size=4)  # dynamic batch: 4, then 2
    assert _agreement(reference, got) < TOLERANCE
    assert torch.equal(got.argmax(1), reference.argmax(1))

    graph = onnx.load(str(path)).graph
    int8 = [init for init in graph.initializer if init.data_type == onnx.TensorProto.INT8]
    # Every quantized weight (6 blocks x qkv, proj, fc1, fc2, the head and the patch conv) is stored as int8 codes.
    assert len(int8) == 6 * 4 + 2
    ops = integer_ops(path)
    assert sum(ops.get(op, 0) for op in ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger")) >= 6 * 5

    # The tolerance is tight enough to catch a wrong scale: double one activation scale.
    model = onnx.load(str(path))
    scales = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT and "scale" in init.name.lower()]
    if not scales:  # the exporter keeps scales as Constant nodes
        scales = [n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].t.dims == []]
    target = scales[len(scales) // 2]
    doubled = numpy_helper.to_array(target) * 2
    target.CopyFrom(numpy_helper.from_array(doubled.astype(np.float32), target.name))
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    assert _agreement(reference, onnx_logits(onnx_session(tmp_path / "wrong.onnx"), x)) > TOLERANCE


def _scalar_scales(path) -> list[float]:
    """Every scalar float constant of an ONNX graph (QDQ scales among them)."""
    graph = onnx.load(str(path)).graph
    tensors = [*graph.initializer, *(n.attribute[0].t for n in graph.node if n.op_type == "Constant")]
    return [float(numpy_helper.to_array(t).reshape(())) for t in tensors if t.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(t).size == 1]


def test_repq_log2_softmax_exports_as_the_uniform_grid_over_its_range(tmp_path, quantized_vit):
    """RepQ at 8-bit activations keeps the log2 softmax grid; the export writes the uniform 8-bit grid over [0, delta]."""
    model, _ = quantized_vit
    qmodel = quantize_(copy.deepcopy(model), QuantConfig.for_method("repq", 8, 8), noise_batches(model, 8, 8), progress=False)
    log2 = [m for m in qmodel.modules() if isinstance(m, Log2Quantizer)]
    assert len(log2) == 6 and qmodel.quantization.config.ln_reparam
    path = tmp_path / "repq.onnx"
    assert export_onnx(qmodel, path) == ["log2 grids (softmax, post-GELU) have no QDQ form: exported as the uniform 8-bit grid over the same range."]
    scales = _scalar_scales(path)
    for q in log2:  # each softmax output: step delta / 255, zero point 0
        assert any(s == pytest.approx(float(q.scale) / 255, rel=1e-6) for s in scales), float(q.scale)
    torch.manual_seed(1)
    x = torch.randn(6, 3, 160, 160)
    with torch.no_grad():
        on_log2_grid = sparse_forward(qmodel, x).logits
        full = model(x)
        with _exporting(qmodel):  # the model as the exporter traces it
            as_traced = sparse_forward(qmodel, x).logits
    got = onnx_logits(onnx_session(path), x)
    assert _agreement(as_traced, got) < TOLERANCE  # ONNX Runtime computes the traced (uniform-grid) model
    assert torch.equal(got.argmax(1), as_traced.argmax(1))
    # ...which differs from the log2-grid model by less than quantizing does at all.
    assert _agreement(on_log2_grid, got) < 0.5 * _agreement(full, on_log2_grid)
    ops = integer_ops(path)
    assert sum(ops.get(op, 0) for op in ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger")) >= 6 * 5


def test_full_precision_export_equals_the_model(tmp_path, quantized_vit):
    model, _ = quantized_vit
    path = tmp_path / "fp.onnx"
    export_onnx(model, path, batch_size=3)
    x = torch.randn(5, 3, 160, 160)
    session = onnx_session(path)
    assert session.get_inputs()[0].shape[0] == 3
    with torch.no_grad():
        assert torch.allclose(onnx_logits(session, x), model(x), atol=1e-4)  # 5 images through a batch of 3: padded


def test_real_deit_tiny_export_agrees_on_real_images(tmp_path, deit_tiny):
    folder = ImageFolder.scan(VAL, read_class_index(SYNSETS), limit_per_class=1)
    images, _ = transform_folder(folder, deit_tiny)
    qmodel = quantize_(copy.deepcopy(deit_tiny), QuantConfig.for_method("calib", 8, 8), noise_batches(deit_tiny, 8, 8), progress=False)
    path = tmp_path / "deit.onnx"
    export_onnx(qmodel, path)
    with torch.no_grad():
        reference = sparse_forward(qmodel, images).logits
    got = onnx_logits(onnx_session(path), images)
    assert _agreement(reference, got) < TOLERANCE
    top2 = reference.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0  # agreement is promised where the top class is not a near-tie
    assert clear.sum() >= 5
    assert torch.equal(got.argmax(1)[clear], reference.argmax(1)[clear])


# ---------------------------------------------------------------- the CLI and bad input


@pytest.fixture(scope="module")
def files(tmp_path_factory, quantized_vit):
    model, _ = quantized_vit
    root = tmp_path_factory.mktemp("export")
    ckpt = root / "test_vit.safetensors"
    save_file(model.state_dict(), str(ckpt))
    made = {"ckpt": ckpt}
    for name, config in (("w8a8", QuantConfig.for_method("calib", 8, 8)), ("psaq", QuantConfig.for_method("psaq", 8, 8)),
                         ("w8a4", QuantConfig.for_method("calib", 8, 4))):
        fresh = load_model("test_vit", ckpt)
        quantize_(fresh, config, noise_batches(fresh, 4, 4), progress=False)
        made[name] = save_quantized(fresh, root / f"{name}.safetensors", "test_vit")
    return made


def _export(files, out, quantized=None, extra=()):
    argv = ["export", "--model", "test_vit", "--checkpoint", str(files["ckpt"]), "--out", str(out), *extra]
    return argv + (["--quantized", str(files[quantized])] if quantized else [])


def test_cli_export_and_evaluate_onnx(tmp_path, capsys, files):
    out = tmp_path / "q.onnx"
    assert main(_export(files, out, "w8a8")) == 0
    printed = capsys.readouterr().out
    counted = re.search(r"runs (\d+) matrix products as integer kernels", printed)
    assert counted and int(counted.group(1)) == sum(integer_ops(out).get(op, 0) for op in INTEGER_OPS) >= 6 * 5, printed
    # The file is the quantized model given, not the checkpoint's full precision: its weights are int8
    # codes and ONNX Runtime computes what the fake-quantized model does.
    graph = onnx.load(str(out)).graph
    assert sum(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer) == 6 * 4 + 2
    qmodel = load_model("test_vit", files["ckpt"])
    load_quantized(qmodel, files["w8a8"], "test_vit")
    torch.manual_seed(2)
    x = torch.randn(4, 3, 160, 160)
    session = onnx_session(out)
    with torch.no_grad():
        assert _agreement(sparse_forward(qmodel, x).logits, onnx_logits(session, x)) < TOLERANCE

    # evaluate --onnx: six distinct images, the first three filed under the synset of the class the
    # ONNX model gives them, the last three under the next class: top-1 is 50 exactly.
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (170, 170, 3), dtype=np.uint8)) for _ in range(6)]
    staging = tmp_path / "staging" / "n01440764"
    staging.mkdir(parents=True)
    for i, picture in enumerate(pictures):
        picture.save(staging / f"{i}.png")
    images, _ = transform_folder(ImageFolder.scan(staging.parent, read_class_index(SYNSETS)), qmodel)
    logits = onnx_logits(session, images, batch_size=64)
    predicted = logits.argmax(1).tolist()
    synsets = list(read_class_index(SYNSETS))
    data = tmp_path / "images"
    for i, picture in enumerate(pictures):
        label = predicted[i] if i < 3 else (predicted[i] + 1) % 1000
        (data / synsets[label]).mkdir(parents=True, exist_ok=True)
        picture.save(data / synsets[label] / f"{i}.png")
    top5 = logits.topk(5, dim=1).indices
    expected_top5 = 100.0 * sum(int((predicted[i] + 1) % 1000 in top5[i].tolist()) for i in range(3, 6)) / 6 + 50.0
    report = tmp_path / "onnx.json"
    common = ["--model", "test_vit", "--checkpoint", str(files["ckpt"]), "--data", str(data), "--quiet"]
    assert main(["evaluate", *common, "--onnx", str(out), "--json", str(report)]) == 0
    assert "ONNX" in capsys.readouterr().out
    record = json.loads(report.read_text())
    assert (record["num_images"], record["top1"], record["top5"], record["onnx"]) == (6, 50.0, expected_top5, str(out))


@pytest.mark.parametrize(
    "quantized, extra, message",
    [
        ("psaq", (), "needs the 'int' scheme"),
        ("w8a4", (), "needs 8-bit activations"),
        ("w8a8", ("--onnx-batch-size", "zero"), "--onnx-batch-size must be"),
    ],
)
def test_cli_export_refuses(tmp_path, capsys, files, quantized, extra, message):
    out = tmp_path / "q.onnx"
    assert main(_export(files, out, quantized, extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_export_refuses_another_models_file_and_unwritable_out(tmp_path, capsys, files):
    argv = ["export", "--model", "deit_tiny_patch16_224", "--checkpoint", str(DEIT_TINY_CKPT), "--quantized", str(files["w8a8"]),
            "--out", str(tmp_path / "q.onnx")]
    assert main(argv) == 2
    assert "made for test_vit" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(_export(files, tmp_path / "file" / "q.onnx", "w8a8")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_evaluate_refuses_a_damaged_onnx_file(tmp_path, capsys, files):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    (tmp_path / "images" / "n01440764").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (160, 160)).save(tmp_path / "images" / "n01440764" / "0.png")
    argv = ["evaluate", "--model", "test_vit", "--checkpoint", str(files["ckpt"]), "--data", str(tmp_path / "images"), "--onnx", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be loaded by ONNX Runtime" in err, err


def test_models_other_than_test_vit_export_too(tmp_path):
    """A distilled DeiT (two heads) exports and runs: the exporter follows timm's own forward."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", depth=2).eval()
    export_onnx(model, tmp_path / "d.onnx")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(onnx_logits(onnx_session(tmp_path / "d.onnx"), x), model(x), atol=1e-4)


def test_the_signed_log2_gelu_grid_exports_as_the_uniform_grid_over_low_to_delta(tmp_path, quantized_vit):
    """The post-GELU log2 grid (``gelu_quantizer="log2"``) exports as the uniform 8-bit grid over [low, delta]."""
    from sparseinv.quant import SignedLog2Quantizer

    model, _ = quantized_vit
    config = QuantConfig.for_method("repq", 8, 8, gelu_quantizer="log2")
    qmodel = quantize_(copy.deepcopy(model), config, noise_batches(model, 8, 8), progress=False)
    gelu = [m for m in qmodel.modules() if isinstance(m, SignedLog2Quantizer)]
    assert len(gelu) == 6 and all(float(q.low) < 0 for q in gelu)
    path = tmp_path / "gelu.onnx"
    export_onnx(qmodel, path)
    scales = _scalar_scales(path)
    for q in gelu:
        assert any(s == pytest.approx((float(q.scale) - float(q.low)) / 255, rel=1e-6) for s in scales)
    torch.manual_seed(1)
    x = torch.randn(6, 3, 160, 160)
    with torch.no_grad(), _exporting(qmodel):
        as_traced = sparse_forward(qmodel, x).logits
    assert _agreement(as_traced, onnx_logits(onnx_session(path), x)) < TOLERANCE
