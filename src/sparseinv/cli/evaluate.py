"""``sparseinv evaluate``: top-1/top-5 of a model, full precision or quantized, on a labelled folder."""

from __future__ import annotations

import argparse
import sys

from sparseinv.cli.common import Renamed, add_device, add_model, add_quiet, add_renamed, model_from_args, resolve_device
from sparseinv.errors import UsageError
from sparseinv.files import atomic_write_json, check_writable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="top-1 and top-5 accuracy on a folder of labelled images",
        description="Evaluate a timm ViT, optionally with a file from 'sparseinv quantize', with timm's eval transform.",
    )
    add_model(p)
    p.add_argument("--quantized", help="a .safetensors file written by 'sparseinv quantize'")
    p.add_argument("--onnx", help="evaluate this ONNX model (from 'sparseinv export') with ONNX Runtime instead; --model gives only "
                                  "the transform, no weights are loaded")
    p.add_argument("--data", required=True, help="folder of class sub-folders of images")
    p.add_argument("--class-map", help="file whose line i starts with class i's folder name (default: ImageNet synset folders map "
                                       "by synset for 1000-class models; otherwise sorted folder order, when the counts match)")
    p.add_argument("--class-index", dest="class_map", action=Renamed, new="--class-map")
    p.add_argument("--num-images-per-class", type=int, help="only the first N images of each class")
    add_renamed(p, ["--limit-per-class"], "--num-images-per-class", "num_images_per_class", type=int)
    p.add_argument("--eval-batch-size", type=int, default=64, help="images per forward pass")
    add_renamed(p, ["-b", "--batch-size"], "--eval-batch-size", "eval_batch_size", type=int)
    p.add_argument("--json", help="also write the result to this JSON file")
    add_quiet(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseinv.classes import folder_class_index
    from sparseinv.data import ImageFolder, evaluate
    from sparseinv.models import load_model
    from sparseinv.quant import load_quantized, read_header

    if args.num_images_per_class is not None and args.num_images_per_class < 1:
        raise UsageError(f"--num-images-per-class {args.num_images_per_class} must be at least 1.")
    if args.json:
        check_writable(args.json, "--json")
    if args.quantized and args.onnx:
        raise UsageError("give --quantized or --onnx, not both: an exported model carries its quantization.")
    if args.quantized:
        read_header(args.quantized)  # a wrong file fails before the model loads
    folders = ImageFolder.class_folders(args.data)
    device = resolve_device(args)
    if args.onnx:
        from sparseinv.quant.export import evaluate_onnx, onnx_classes, onnx_session

        session = onnx_session(args.onnx)
        # The ONNX file carries the weights: the timm model only gives the eval transform.
        model = load_model(args.model, None, pretrained=False, num_classes=onnx_classes(session))
    else:
        model = model_from_args(args, device)
    class_index, note = folder_class_index(folders, model.num_classes, args.class_map, f"'{args.data}'")
    folder = ImageFolder.scan(args.data, class_index, args.num_images_per_class)
    if max(folder.labels) >= model.num_classes:
        raise UsageError(f"'{args.data}' has class index {max(folder.labels)}, but {args.model} has only {model.num_classes} classes.")
    if args.quantized:
        load_quantized(model, args.quantized, args.model)
    if args.onnx:
        result = evaluate_onnx(session, folder, model, batch_size=args.eval_batch_size, progress=not args.quiet)
    else:
        result = evaluate(model, folder, batch_size=args.eval_batch_size, progress=not args.quiet)
    from sparseinv.quant import quantization

    config = None if quantization(model) is None else quantization(model).config
    record = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "quantized": args.quantized,
        "onnx": args.onnx,
        "quant_config": None if config is None else config.record(),
        "data": str(args.data),
        "limit_per_class": args.num_images_per_class,
        **result,
    }
    if args.json:
        atomic_write_json(args.json, record)
    label = f"ONNX {args.onnx}" if args.onnx else "full precision" if config is None else config.name
    print(f"{args.model} ({label}) on {result['num_images']} images: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0
