"""``sparseinv export``: write a model, full precision or quantized, as ONNX (integer QDQ when quantized)."""

from __future__ import annotations

import argparse
import os

from sparseinv.cli.common import add_model, model_from_args
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
    p.add_argument("-b", "--batch-size", default="dynamic", help="'dynamic' or a fixed batch size N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch while tracing (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print only the result line, not the exporter's notes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseinv.quant import load_quantized, read_header

    batch = None
    if args.batch_size != "dynamic":
        try:
            batch = int(args.batch_size)
        except ValueError:
            batch = 0
        if batch < 1:
            raise UsageError(f"--batch-size must be 'dynamic' or a positive integer, got '{args.batch_size}'.")
    check_writable(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quantized:
        read_header(args.quantized)  # a wrong file fails before the model loads
    model = model_from_args(args, torch.device("cpu"))
    if args.quantized:
        load_quantized(model, args.quantized, args.model)
    from sparseinv.export import INTEGER_OPS, export_onnx, integer_ops

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
