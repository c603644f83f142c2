"""``sparseinv export``: write a model, full precision or quantized, as ONNX (integer QDQ when quantized)."""

from __future__ import annotations

import argparse
import os

from sparseinv.cli.common import add_device, add_model, add_quiet, add_renamed, model_from_args, resolve_device
from sparseinv.errors import UsageError
from sparseinv.files import check_writable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as ONNX: integer QDQ with our scales and codes when --quantized is given",
        description=(
            "Export a timm ViT to ONNX for ONNX Runtime (or OpenVINO, TensorRT). With --quantized, every activation "
            "quantizer becomes a QuantizeLinear/DequantizeLinear pair with its calibrated scale and zero point and every "
            "weight int8 codes with per-channel scales, so ONNX Runtime runs the matrix products as integer kernels. "
            "Needs the 'int' scheme and 8-bit activations."
        ),
    )
    add_model(p)
    p.add_argument("--quantized", help="a .safetensors file from 'sparseinv quantize' (default: export full precision)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--onnx-batch-size", default="dynamic", help="the ONNX model's batch dimension: 'dynamic' or a fixed N")
    add_renamed(p, ["-b", "--batch-size"], "--onnx-batch-size", "onnx_batch_size")
    add_quiet(p)
    add_device(p)  # the model loads there; the exporter traces it on the CPU
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseinv.quant import load_quantized, read_header

    batch = None
    if args.onnx_batch_size != "dynamic":
        try:
            batch = int(args.onnx_batch_size)
        except ValueError:
            batch = 0
        if batch < 1:
            raise UsageError(f"--onnx-batch-size must be 'dynamic' or a positive integer, got '{args.onnx_batch_size}'.")
    check_writable(args.out)
    if args.quantized:
        read_header(args.quantized)  # a wrong file fails before the model loads
    model = model_from_args(args, resolve_device(args))
    if args.quantized:
        load_quantized(model, args.quantized, args.model)
    from sparseinv.quant.export import INTEGER_OPS, export_onnx, integer_ops

    notes = export_onnx(model, args.out, batch)
    for note in [] if args.quiet else notes:
        print(f"note: {note}")
    ops = integer_ops(args.out) if args.quantized else {}
    integer = sum(n for op, n in ops.items() if op in INTEGER_OPS)
    size = os.path.getsize(args.out) / 2**20
    kind = "integer QDQ" if args.quantized else "full precision"
    ops_text = f" | ONNX Runtime runs {integer} matrix products as integer kernels ({', '.join(f'{k} {v}' for k, v in ops.items())})" if ops else ""
    print(f"exported {args.model} ({kind}) -> {args.out} | {size:.1f} MiB{ops_text}")
    return 0
