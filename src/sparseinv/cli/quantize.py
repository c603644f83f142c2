"""``sparseinv quantize``: fake-quantize a ViT, calibrate it, save its scales."""

from __future__ import annotations

import argparse

from sparseinv.cli.common import add_device, add_model, config_from_args, model_from_args, resolve_device
from sparseinv.quant import CALIBRATORS, QuantConfig, calibrate, calibration_batches, fingerprint, quantize_, save_quantized


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="fake-quantize a ViT, calibrated on a pool, noise or real images",
        description=(
            "Quantize a timm ViT (weights symmetric per output channel, activations asymmetric per tensor) and "
            "calibrate its activation ranges. Sparse pools are fed as their kept patches only."
        ),
    )
    add_model(p)
    p.add_argument("--calib", required=True, help="a pool folder, 'noise' (N(0,1) in normalised space) or a folder of real images in class sub-folders")
    p.add_argument("--w-bits", type=int, default=8, help="weight bit-width, 2..8 (default 8)")
    p.add_argument("--a-bits", type=int, default=8, help="activation bit-width, 2..8 (default 8)")
    p.add_argument("--calibrator", choices=CALIBRATORS, default="minmax", help="how ranges are chosen (default minmax, the PSAQ-ViT baseline)")
    p.add_argument("--percentile", type=float, default=99.99, help="upper percentile for --calibrator percentile (default 99.99)")
    p.add_argument("--channelwise-ln", action="store_true", help="per-channel ranges for the inputs of qkv, fc1 and head (post-LayerNorm); helps with real calibration images, not synthetic ones")
    p.add_argument("--weight-calibrator", choices=("minmax", "mse"), help="how weight ranges are chosen (default: as --calibrator); --calibrator minmax --weight-calibrator mse is our most accurate setting on synthetic pools")
    p.add_argument("--num-calib", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for --calib noise")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(QuantConfig, args).validate()  # before the model loads: cheap mistakes first
    device = resolve_device(args)
    model = model_from_args(args, device)
    batches = calibration_batches(model, args.calib, args.model, args.num_calib, args.batch_size, args.seed)
    fp = fingerprint(model)
    quantize_(model, config)
    calibrate(model, batches, progress=not args.quiet)
    path = save_quantized(model, args.out, args.model, fp)
    num = sum(images.shape[0] for images, _ in batches)
    sparse = any(keep is not None for _, keep in batches)
    print(f"quantized {args.model} {config.name} on {num} {'sparse ' if sparse else ''}calibration images from {args.calib} -> {path}")
    return 0
