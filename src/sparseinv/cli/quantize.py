"""``sparseinv quantize``: quantize a ViT from calibration images, save everything it learned."""

from __future__ import annotations

import argparse
import dataclasses
import time

from sparseinv.cli.common import add_device, add_model, add_quiet, add_renamed, model_from_args, resolve_device
from sparseinv.errors import UsageError
from sparseinv.files import check_writable
from sparseinv.quant.config import CALIBRATORS, DEFAULT_METHOD, METHODS, SCHEMES, QuantConfig, ReconConfig

METHOD_HELP = (
    "psaq: PSAQ-ViT's baseline (scheme psaq, min/max ranges observed in full precision); "
    "calib: every matrix-product input quantized (scheme int), pmse ranges calibrated sequentially, MSE-clipped weights; "
    "repq: calib + RepQ-ViT-style quantizers (per-channel LayerNorm ranges folded into per-tensor, log2 softmax grid, "
    "pmse post-GELU range); "
    f"recon: repq + block-wise reconstruction (learned rounding and step sizes, QDrop). Default {DEFAULT_METHOD}, our most "
    "accurate; it takes minutes on a CPU (about 2 for DeiT-Tiny from 32 sparse images, 2 cores)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a ViT (default: W8/A8 reconstruction) from a pool, noise or real images",
        description=(
            "Quantize a timm ViT and fit it to calibration images: ranges, LayerNorm folding and block-wise "
            "reconstruction as --method says. Sparse pools are fed as their kept patches only. Writes every scale, "
            "zero point, weight code and fold factor to one .safetensors file that 'sparseinv evaluate --quantized' reads."
        ),
    )
    add_model(p)
    p.add_argument("--calib", required=True, help="a pool folder, 'noise' (N(0,1) in normalised space) or a folder of real images in class sub-folders")
    p.add_argument("--w-bits", type=int, default=QuantConfig.w_bits, help=f"weight bit-width, 2..8 (default {QuantConfig.w_bits})")
    p.add_argument("--a-bits", type=int, default=QuantConfig.a_bits, help=f"activation bit-width, 2..8 (default {QuantConfig.a_bits})")
    p.add_argument("--method", choices=tuple(METHODS), default=DEFAULT_METHOD, help=METHOD_HELP)
    g = p.add_argument_group("overrides of the method's settings (default: the method's)")
    g.add_argument("--scheme", choices=SCHEMES, help="int: the inputs of every matrix product; psaq: PSAQ-ViT's tensors")
    g.add_argument("--calibrator", choices=CALIBRATORS, help="how activation ranges are chosen: minmax; percentile; mse (least-error "
                   "clipping, searched down to 4%% of the range); pmse (min/max or a 99.9-99.999th percentile clipping, least error)")
    g.add_argument("--weight-calibrator", choices=("minmax", "mse"), help="how weight ranges are chosen")
    g.add_argument("--gelu-calibrator", choices=CALIBRATORS, help="range of the post-GELU activation (int scheme)")
    g.add_argument("--softmax-quantizer", choices=("uniform", "log2"), help="grid of the softmax output (int scheme)")
    g.add_argument("--gelu-quantizer", choices=("uniform", "log2"), help="grid of the post-GELU activation: uniform, or one negative "
                                                                        "level, zero and log2-spaced positives (int scheme)")
    g.add_argument("--ln-reparam", action=argparse.BooleanOptionalAction, default=None, help="fold per-channel post-LayerNorm ranges (int scheme)")
    g.add_argument("--channelwise-ln", action=argparse.BooleanOptionalAction, default=None, help="per-channel post-LayerNorm ranges, unfolded (psaq scheme)")
    g.add_argument("--percentile", type=float, help="upper percentile for --calibrator percentile (default 99.99)")
    r = p.add_argument_group("block reconstruction (method recon)")
    defaults = ReconConfig()
    r.add_argument("--recon-iters", type=int, help=f"steps per block (default {defaults.iters})")
    r.add_argument("--recon-batch-size", type=int, help=f"images per step (default {defaults.batch_size})")
    r.add_argument("--recon-lr", type=float, help=f"learning rate of the rounding logits (default {defaults.lr_round})")
    r.add_argument("--recon-drop", type=float, help=f"QDrop probability (default {defaults.drop_prob})")
    r.add_argument("--recon-views", type=int, help=f"whole-patch rolls and mirrors of each image to reconstruct on (default {defaults.views})")
    p.add_argument("--calib-num-images", type=int, default=32, help="calibration images (default 32)")
    add_renamed(p, ["--num-calib"], "--calib-num-images", "calib_num_images", type=int)
    p.add_argument("--calib-batch-size", type=int, default=32, help="calibration images per forward pass (default 32)")
    add_renamed(p, ["-b", "--batch-size"], "--calib-batch-size", "calib_batch_size", type=int)
    p.add_argument("--seed", type=int, default=0, help="seed for --calib noise and reconstruction")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--allow-other-weights", action="store_true", help="accept a --calib pool inverted from other weights than --checkpoint's")
    add_quiet(p)
    add_device(p)
    p.set_defaults(func=run)


RECON_ARGS = {"recon_iters": "iters", "recon_batch_size": "batch_size", "recon_lr": "lr_round", "recon_drop": "drop_prob",
              "recon_views": "views"}
CONFIG_ARGS = ("scheme", "calibrator", "weight_calibrator", "gelu_calibrator", "gelu_quantizer", "softmax_quantizer", "ln_reparam", "channelwise_ln", "percentile")


def config_from(args: argparse.Namespace) -> QuantConfig:
    """The method's settings with every given override on top."""
    config = QuantConfig.for_method(args.method, args.w_bits, args.a_bits)
    overrides = {name: getattr(args, name) for name in CONFIG_ARGS if getattr(args, name) is not None}
    recon = {field: getattr(args, arg) for arg, field in RECON_ARGS.items() if getattr(args, arg) is not None}
    if recon and config.recon is None:
        raise UsageError(f"--{next(iter(recon))} and the other --recon-* options need --method recon.")
    if config.recon is not None:
        overrides["recon"] = dataclasses.replace(config.recon, seed=args.seed, **recon)
    return dataclasses.replace(config, **overrides).validate()


def run(args: argparse.Namespace) -> int:
    from sparseinv.quant import calibration_batches, quantize_, save_quantized

    config = config_from(args)  # before the model loads: cheap mistakes first
    check_writable(args.out)
    device = resolve_device(args)
    model = model_from_args(args, device)
    batches = calibration_batches(model, args.calib, args.model, args.calib_num_images, args.calib_batch_size, args.seed,
                                  args.allow_other_weights)
    start = time.perf_counter()
    quantize_(model, config, batches, progress=not args.quiet)
    seconds = time.perf_counter() - start
    path = save_quantized(model, args.out, args.model)
    num = sum(images.shape[0] for images, _ in batches)
    sparse = any(keep is not None for _, keep in batches)
    print(f"quantized {args.model} {config.name} on {num} {'sparse ' if sparse else ''}calibration images from {args.calib} "
          f"in {seconds:.0f} s -> {path}")
    return 0
