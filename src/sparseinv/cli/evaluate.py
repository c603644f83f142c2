"""``sparseinv evaluate``: top-1/top-5 of a model, full precision or quantized, on a labelled folder."""

from __future__ import annotations

import argparse

from sparseinv.cli.common import add_device, add_model, model_from_args, resolve_device
from sparseinv.data import ImageFolder, evaluate, read_class_index
from sparseinv.errors import UsageError
from sparseinv.files import atomic_write_json, check_writable
from sparseinv.quant import load_quantized, read_header


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="top-1 and top-5 accuracy on a folder of labelled images",
        description="Evaluate a timm ViT, optionally with a file from 'sparseinv quantize', with timm's eval transform.",
    )
    add_model(p)
    p.add_argument("--quantized", help="a .safetensors file written by 'sparseinv quantize'")
    p.add_argument("--onnx", help="evaluate this ONNX model (from 'sparseinv export') with ONNX Runtime instead; --model gives the transform")
    p.add_argument("--data", required=True, help="folder of class sub-folders of images")
    p.add_argument("--class-index", help="file whose line i starts with class i's folder name, e.g. imagenet_synsets.txt (default: sorted folder order)")
    p.add_argument("--limit-per-class", type=int, help="only the first N images of each class")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.limit_per_class is not None and args.limit_per_class < 1:
        raise UsageError(f"--limit-per-class {args.limit_per_class} must be at least 1.")
    if args.json:
        check_writable(args.json, "--json")
    class_index = read_class_index(args.class_index) if args.class_index else None
    folder = ImageFolder.scan(args.data, class_index, args.limit_per_class)
    if args.quantized and args.onnx:
        raise UsageError("give --quantized or --onnx, not both: an exported model carries its quantization.")
    if args.quantized:
        read_header(args.quantized)  # a wrong file fails before the model loads
    device = resolve_device(args)
    model = model_from_args(args, device)
    if max(folder.labels) >= model.num_classes:
        raise UsageError(f"'{args.data}' has class index {max(folder.labels)}, but {args.model} has only {model.num_classes} classes.")
    if args.quantized:
        load_quantized(model, args.quantized, args.model)
    if args.onnx:
        from sparseinv.export import evaluate_onnx

        result = evaluate_onnx(args.onnx, folder, model, batch_size=args.batch_size, progress=not args.quiet)
    else:
        result = evaluate(model, folder, batch_size=args.batch_size, progress=not args.quiet)
    config = getattr(model, "quant_config", None)
    record = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "quantized": args.quantized,
        "onnx": args.onnx,
        "quant_config": None if config is None else config.record(),
        "data": str(args.data),
        "limit_per_class": args.limit_per_class,
        **result,
    }
    if args.json:
        atomic_write_json(args.json, record)
    label = f"ONNX {args.onnx}" if args.onnx else "full precision" if config is None else config.name
    print(f"{args.model} ({label}) on {result['num_images']} images: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}")
    return 0
