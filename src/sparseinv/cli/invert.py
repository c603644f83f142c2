"""``sparseinv invert``: write a pool of dense or sparse synthetic images."""

from __future__ import annotations

import argparse
from dataclasses import replace

from sparseinv.cli.common import add_device, add_model, add_quiet, config_from_args, model_from_args, resolve_device
from sparseinv.errors import UsageError
from sparseinv.files import FolderLock, check_writable
from sparseinv.inversion.config import FINAL_MASKS, PRECISIONS, InversionConfig
from sparseinv.inversion.schedule import PruneSchedule

SCHEDULES = ("reference", "rebirth")
# The options' defaults are the API's (InversionConfig's fields); the loss weights' are InversionLoss's,
# filled in by config_from (its module needs torch, which `sparseinv invert --help` never loads).
D = InversionConfig
LOSS_OPTIONS = ("tv_l2", "tv_l1", "l2", "patch_entropy", "attention_prior", "head_similarity")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "invert",
        help="invert a ViT into a pool of labelled synthetic images",
        description="Invert a timm ViT into labelled synthetic images: sparse by default (the paper's schedule, scaled to "
                    "--iterations); --dense for the baseline, --prune-at/--prune-ratio for a schedule of your own.",
    )
    add_model(p)
    p.add_argument("--out", required=True, help="pool folder; an unfinished pool with the same settings is continued")
    p.add_argument("--num-images", type=int, default=D.num_images, help="images to invert (labels balanced over --classes or all classes)")
    p.add_argument("-b", "--batch-size", type=int, default=D.batch_size, help="images per optimisation step; each batch is committed to the pool when done")
    p.add_argument("--iterations", type=int, default=D.iterations, help="optimisation steps per batch (the paper: 4000)")
    p.add_argument("--lr", type=float, default=D.lr, help="Adam learning rate on the pixels")
    p.add_argument("--tv-l2", type=float, help="weight of the L2 total variation (default 1e-4)")
    p.add_argument("--tv-l1", type=float, help="weight of the L1 total variation (default off)")
    p.add_argument("--l2", type=float, help="weight of the pixels' L2 norm (default off)")
    p.add_argument("--patch-entropy", type=float, metavar="W",
                   help="weight of PSAQ-ViT's patch-similarity prior: rewards a spread of similarities between the fed patch "
                        "tokens in every block (default off)")
    p.add_argument("--attention-prior", type=float, metavar="W",
                   help="weight of an attention prior (after SARDFQ): the last block's class-token attention is pulled toward a "
                        "random Gaussian region of each image (default off)")
    p.add_argument("--head-similarity", type=float, metavar="W",
                   help="weight of an inter-head attention-similarity prior (after MimiQ): the heads of every block are pulled "
                        "toward attending to the same places, as they do on real images (default off)")
    p.add_argument("--color-shift", type=float, default=D.color_shift, metavar="S",
                   help="Plug-In Inversion's colour shift: each step sees every image's channels scaled by exp(U(-S, S)) and "
                        "offset by U(-S, S) (default off)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--schedule", choices=SCHEDULES, default="reference",
                      help="reference: the paper's stops at steps 50/100/200/300 of 4000, 30%% of the kept patches each "
                           "(196 -> 46), scaled to --iterations; rebirth: Patch Rebirth Inversion, the most-attended 25%% of "
                           "all patches are detached into the output at steps 400/800/1600 of 4000 (scaled) and the rest keep "
                           "inverting, the last quarter until the end; with --prune-at/--prune-ratio the ratios are shares of "
                           "all patches detached at each step (default: reference; see docs/rebirth.md)")
    kind.add_argument("--dense", action="store_true", help="dense inversion, every patch every step (the slow baseline)")
    p.add_argument("--prune-at", type=int, nargs="*", default=[], metavar="STEP", help="a schedule of your own: stop steps, e.g. 50 100 200 300")
    p.add_argument("--prune-ratio", type=float, nargs="*", default=[], metavar="R", help="fraction of the kept patches stopped at each, e.g. 0.3 0.3 0.3 0.3")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="classes to invert: indices, or for ImageNet models synsets or names such as tench or 'golden retriever' "
                        "(default: all classes, balanced)")
    p.add_argument("--final-mask", choices=FINAL_MASKS, default=D.final_mask,
                   help="the output mask of sparse images: last-phase (the patches the last phase optimised) or rescore (the "
                        "paper's: one dense pass keeps the top int(N*prod(1-r)) of all patches) (default: last-phase)")
    p.add_argument("--precision", choices=PRECISIONS, default=D.precision,
                   help="the model's arithmetic: bf16 autocast (pixels, optimiser and loss stay fp32); auto: bf16 where this device "
                        "computes it faster (a short probe), else fp32 (default: fp32)")
    p.add_argument("--seed", type=int, default=D.seed, help="seeds labels, initial pixels and augmentations (batch b uses seed and b)")
    add_quiet(p)
    add_device(p)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --device cuda: replay each phase's step as one captured CUDA graph (fewer kernel launches; "
                        "the same images up to float rounding) (default: off)")
    p.set_defaults(func=run)


def strategy_from_args(args: argparse.Namespace) -> str:
    """What a stop step does: "rebirth" for --schedule rebirth, else "stop" (Sparse Model Inversion)."""
    return "rebirth" if not args.dense and args.schedule == "rebirth" else "stop"


def schedule_from_args(args: argparse.Namespace) -> PruneSchedule:
    """--dense, --prune-at/--prune-ratio, or the named --schedule at --iterations."""
    custom = bool(args.prune_at or args.prune_ratio)
    if args.dense and custom:
        raise UsageError("--dense inverts every patch: it takes no --prune-at/--prune-ratio.")
    if args.dense:
        return PruneSchedule()
    if custom:
        return PruneSchedule(tuple(args.prune_at), tuple(args.prune_ratio))
    schedule = PruneSchedule.rebirth(args.iterations) if args.schedule == "rebirth" else PruneSchedule.reference(args.iterations)
    if args.iterations <= schedule.steps[-1]:
        raise UsageError(f"--iterations {args.iterations} is too short for the {args.schedule} schedule's {len(schedule.steps)} stops: "
                         f"use at least {schedule.steps[-1] + 1}, or --dense.")
    return schedule


def config_from(args: argparse.Namespace) -> InversionConfig:
    """The run's settings: the options given, :class:`InversionConfig`'s (and its loss's) defaults for the rest."""
    from sparseinv.inversion.losses import InversionLoss

    weights = {name: getattr(args, name) for name in LOSS_OPTIONS if getattr(args, name) is not None}
    return config_from_args(InversionConfig, args, schedule=schedule_from_args(args), strategy=strategy_from_args(args),
                            loss=InversionLoss(**weights), classes=None)


def run(args: argparse.Namespace) -> int:
    from sparseinv import distributed
    from sparseinv.classes import resolve_classes
    from sparseinv.runs.inversion import check_cuda_graphs, invert, run_record
    from sparseinv.pool import PoolWriter

    config = config_from(args)
    config.validate()  # before the model loads: cheap mistakes first
    rank = distributed.current()

    def check_out() -> None:  # a typo or a busy folder costs a second, not a model load
        check_writable(args.out, "--out", folder=True)
        FolderLock.refuse_if_held(args.out)

    # Rank 0 alone: under torchrun the other ranks would find the folder locked by rank 0's writer.
    rank.on_main(check_out)
    device = resolve_device(args)
    check_cuda_graphs(args.cuda_graphs, device)  # before the model loads
    model = model_from_args(args, device)
    if args.classes:
        config = replace(config, classes=resolve_classes(args.classes, model.num_classes))
    config.validate(model.num_classes)
    rank.on_main(PoolWriter(args.out, run_record(model, config, args.model, args.checkpoint, args.cuda_graphs)).check)
    result = invert(model, config, args.out, model_name=args.model, checkpoint=args.checkpoint, progress=not args.quiet,
                    cuda_graphs=args.cuda_graphs)
    run = result.run
    if not rank.is_main:
        return 0
    # Several processes: the wall clock of this command, and the batches' summed time beside it.
    where = f" | {rank.world_size} processes, {run['elapsed_seconds']:.1f} s elapsed" if rank.active else ""
    kind = "dense" if config.schedule.is_dense else "rebirth" if config.strategy == "rebirth" else "sparse"
    print(
        f"{kind} inversion: {run['num_images']} images in {args.out} | {run['wall_seconds']:.1f} s | "
        f"success rate {run['success_rate']:.3f} | patches kept {result.kept_patches.shape[1]}/{run['num_patches']}{where}"
    )
    return 0
