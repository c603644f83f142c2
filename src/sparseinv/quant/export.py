"""Integer ONNX export of a quantized ViT, and running it with ONNX Runtime.

A model from :func:`sparseinv.quant.quantize_` (scheme ``int``) is traced with every
activation quantizer as a QuantizeLinear/DequantizeLinear (QDQ) pair carrying exactly
its calibrated scale and zero point, and every weight as its integer codes: int8
initializers feeding a per-channel DequantizeLinear (4-bit codes are stored in int8:
ONNX Runtime's CPU kernels take int8). ONNX Runtime fuses each DQ -> MatMul -> Q into an
integer matrix product (``integer_ops`` counts them after its graph optimisation).

What standard QDQ cannot express is exported in its nearest integer form and said so:
the log2 softmax grid becomes the uniform 8-bit grid over the same range. Activations
must be 8-bit (a 4-bit activation range has no QDQ form that ONNX Runtime runs as
integers); per-channel activation ranges are refused (fold them with ``ln_reparam``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparseinv.errors import UsageError, first_line
from sparseinv.files import atomic_path
from sparseinv.models import vit_info
from sparseinv.quant.model import quant_modules, quantization
from sparseinv.quant.quantizers import ActQuantizer, Log2Quantizer, QuantWeight

OPSET = 17
INTEGER_OPS = ("QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def export_plan(model: nn.Module) -> list[str]:
    """Check ``model`` can be exported; return one line per approximation the export makes.

    Raises:
        UsageError: a scheme, bit-width or quantizer with no integer QDQ form.
    """
    state = quantization(model)
    if state is None:
        return []
    config = state.config
    if config.scheme != "int":
        raise UsageError(f"integer export needs the 'int' scheme (every matrix-product input quantized), not '{config.scheme}'.")
    if config.a_bits != 8:
        raise UsageError(f"integer export needs 8-bit activations, not {config.a_bits}-bit: ONNX Runtime has no integer kernels for narrower ones.")
    notes = []
    modules = [m for _, m in quant_modules(model)]
    if any(isinstance(m, ActQuantizer) and m.per_channel and m.mode == "quant" and m.scale.numel() > 1 for m in modules):
        raise UsageError("integer export needs per-tensor activation ranges: quantize with --ln-reparam (or without --channelwise-ln).")
    if any(isinstance(m, Log2Quantizer) for m in modules):
        notes.append("log2 grids (softmax, post-GELU) have no QDQ form: exported as the uniform 8-bit grid over the same range.")
    if config.w_bits < 8:
        notes.append(f"{config.w_bits}-bit weight codes are stored as int8 (ONNX Runtime's CPU kernels take int8).")
    return notes


@contextlib.contextmanager
def _exporting(model: nn.Module):
    modules = [m for m in model.modules() if isinstance(m, (ActQuantizer, QuantWeight))]
    for m in modules:
        m.exporting = True
    try:
        yield
    finally:
        for m in modules:
            m.exporting = False


def export_onnx(model: nn.Module, path: str | os.PathLike, batch_size: int | None = None) -> list[str]:
    """Write ``model`` (full precision or quantized) to ``path`` as ONNX; return the export's notes.

    Args:
        model: A timm ViT, optionally after :func:`sparseinv.quant.quantize_`.
        path: The ``.onnx`` file to write (atomically).
        batch_size: A fixed batch size; ``None`` gives a dynamic batch dimension.
    """
    notes = export_plan(model)
    info = vit_info(model)
    model = model.eval().cpu()
    example = torch.zeros(batch_size or 1, *info.input_size)
    dynamic = None if batch_size else {"images": {0: "batch"}, "logits": {0: "batch"}}
    with atomic_path(path) as tmp, _exporting(model), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-level branch in timm's forward; none depends on the input here.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["logits"], dynamic_axes=dynamic, do_constant_folding=True)
        _store_int8_weights(str(tmp))
    return notes


def _store_int8_weights(path: str) -> None:
    """Replace each QuantizeLinear of a constant weight by the int8 codes it would compute."""
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(path)
    graph = graph_model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = node.attribute[0].t
    kept, replaced = [], {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in constants and all(n in constants for n in node.input[1:]):
            weight = numpy_helper.to_array(constants[node.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
            zero = numpy_helper.to_array(constants[node.input[2]])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * weight.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[axis] = scale.size
            codes = np.rint(weight / scale.reshape(shape)) + zero.astype(np.int32).reshape(shape)
            codes = np.clip(codes, -128, 127).astype(np.int8) if zero.dtype == np.int8 else np.clip(codes, 0, 255).astype(np.uint8)
            name = node.output[0]
            graph.initializer.append(numpy_helper.from_array(codes, name))
            replaced[node.input[0]] = True
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    # Float weights no other node reads are dead now.
    still_read = Counter(name for node in graph.node for name in node.input)
    dead = [init for init in graph.initializer if init.name in replaced and not still_read[init.name]]
    for init in dead:
        graph.initializer.remove(init)
    dead_constants = [n for n in graph.node if n.op_type == "Constant" and n.output[0] in replaced and not still_read[n.output[0]]]
    for n in dead_constants:
        graph.node.remove(n)
    onnx.save(graph_model, path)


def onnx_session(path: str | os.PathLike, threads: int | None = None, optimized_path: str | None = None):
    """An ONNX Runtime CPU session for ``path`` with full graph optimisation."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ONNX model '{path}' does not exist.")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's notes on saving optimised graphs are not the user's concern
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        first = first_line(err)
        raise UsageError(f"'{path}' cannot be loaded by ONNX Runtime ({first[:200]}).") from None


def integer_ops(path: str | os.PathLike) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime runs after its optimisation (integer ops and float MatMuls)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        onnx_session(path, optimized_path=optimized)
        counts = Counter(node.op_type for node in onnx.load(optimized).graph.node)
    return {op: n for op, n in sorted(counts.items()) if op in INTEGER_OPS or op in ("MatMul", "Gemm", "Conv", "FusedMatMul")}


def onnx_logits(session, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Logits of an ONNX session on (N, 3, H, W) normalised images, in batches."""
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else batch_size
    out = []
    for start in range(0, images.shape[0], step):
        chunk = images[start : start + step].float().numpy()
        if isinstance(fixed, int) and chunk.shape[0] < fixed:  # a fixed-batch model: pad the last batch
            pad = np.zeros((fixed - chunk.shape[0], *chunk.shape[1:]), dtype=np.float32)
            out.append(torch.from_numpy(session.run(None, {name: np.concatenate([chunk, pad])})[0][: chunk.shape[0]]))
        else:
            out.append(torch.from_numpy(session.run(None, {name: chunk})[0]))
    return torch.cat(out)


def onnx_classes(session) -> int:
    """The class count of an exported classifier: its output's last dimension."""
    shape = session.get_outputs()[0].shape
    if len(shape) != 2 or not isinstance(shape[-1], int):
        raise UsageError(f"the ONNX model's output has shape {shape}, not (batch, classes): is it a 'sparseinv export' file?")
    return shape[-1]


def evaluate_onnx(path, folder, model: nn.Module, *, batch_size: int = 64, progress: bool = True) -> dict:
    """Top-1/top-5 of an ONNX model (a file or an open session) on an image folder, with ``model``'s (timm's) eval transform."""
    from sparseinv.data import load_images, topk_accuracy

    session = onnx_session(path) if isinstance(path, (str, os.PathLike)) else path
    loader = load_images(folder, model, batch_size)
    return topk_accuracy(lambda images: onnx_logits(session, images, batch_size), loader, total=len(loader), progress=progress,
                         desc="evaluate onnx")
