"""``sparseinv distill``: train a student on pools with a teacher's soft labels."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys

from sparseinv.cli.common import Renamed, add_device, add_quiet, add_renamed, model_and_checkpoint, resolve_device
from sparseinv.distill.config import (
    ATTENTION_FORMS,
    FEATURE_LAYERS,
    MIXES,
    MODES,
    OPTIMIZERS,
    QAT_LEARN,
    QUANTIZED_ATTENTION,
    SHALLOW_FEATURES,
    SHALLOW_LR,
    SHALLOW_MIX,
    TARGETS,
    DistillConfig,
)
from sparseinv.errors import UsageError
from sparseinv.files import check_writable

D = DistillConfig()


def _add_term_options(p: argparse.ArgumentParser) -> None:
    """What the student is taught besides the logits, and what a quantized student learns."""
    p.add_argument("--feature-weight", type=float, default=None, metavar="W",
                   help="add W x the relative squared difference of the student's and the teacher's tokens (ViT students as "
                        f"wide as the teacher; default: {SHALLOW_FEATURES[0]:g} for --depth/--blocks/--quantized students, {D.feature_weight:g} otherwise)")
    p.add_argument("--feature-layers", choices=FEATURE_LAYERS, default=None,
                   help="which tokens --feature-weight compares: the final norm's, or every student block's against the teacher's "
                        f"at the same relative depth (default: {SHALLOW_FEATURES[1]} for --depth/--blocks/--quantized students, {D.feature_layers} otherwise)")
    p.add_argument("--attention-weight", type=float, default=None, metavar="W",
                   help="add W x the head-wise attention distillation: each student block's attention maps pulled toward the "
                        "teacher's at the matched block, KL per head and query (ViT students with the teacher's heads; "
                        f"default: {QUANTIZED_ATTENTION:g} for --quantized students, {D.attention_weight:g} otherwise)")
    p.add_argument("--attention-form", choices=ATTENTION_FORMS, default=D.attention_form,
                   help="which query rows --attention-weight compares: every row, or only the class token's and those of the "
                        f"patches the teacher attends to most (default: {D.attention_form})")
    p.add_argument("--qat-learn", choices=QAT_LEARN, default=D.qat_learn,
                   help="what a --quantized student learns: its step sizes only (integer codes kept), its latent weights and "
                        f"weight step sizes, or all (default: {D.qat_learn}, the most accurate measured)")
    p.add_argument("--qat-log-step-sizes", action="store_true", default=None,
                   help="a --quantized student learns each step size as its logarithm: every step moves it by a fraction of itself")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a teacher into a student on pools of synthetic images",
        description=(
            "Train a student on pools' images with the teacher's soft labels: loss = T^2 * KL(softmax(teacher/T) || "
            "softmax(student/T)). Images stream from disk with fresh random crops and flips every epoch, each view "
            "labelled by the teacher; sparse images reach ViTs as their kept tokens only. The student is one of: "
            "--student (any timm model), --depth/--blocks (a shallower copy of the teacher), --quantized (the teacher's "
            "quantized file: quantization-aware training)."
        ),
    )
    p.add_argument("--teacher", required=True, metavar="NAME", help="timm name of the model the pools were inverted from")
    p.add_argument("--teacher-checkpoint", metavar="PATH", help="the teacher's weights (default: timm's pretrained weights from the hub)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--student", metavar="NAME", help="any timm model to train (its head is rebuilt to the teacher's classes)")
    kind.add_argument("--depth", type=int, metavar="N", help="student = the teacher with N of its blocks, spread evenly from the first (12 -> 6: blocks 0, 2, ..., 10)")
    kind.add_argument("--blocks", type=int, nargs="+", metavar="I", help="student = the teacher with exactly these blocks (0-based, in order)")
    kind.add_argument("--quantized", metavar="FILE", help="student = the teacher quantized as in FILE (from 'sparseinv quantize'); --out is then a quantized file")
    p.add_argument("--pool", required=True, nargs="+", help="pool folder(s) written by 'sparseinv invert' from the teacher")
    p.add_argument("--out", required=True, help="student weights (.safetensors); .best.safetensors, .last.pt and .json go beside it")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="linear-probe: frozen backbone, fresh head; full: every weight (default: linear-probe for --student, full otherwise)")
    p.add_argument("--epochs", type=int, default=D.epochs, help=f"passes over the images (default: {D.epochs})")
    p.add_argument("-b", "--batch-size", type=int, default=D.batch_size, help=f"images per optimisation step (default: {D.batch_size})")
    p.add_argument("--temperature", type=float, default=D.temperature, help=f"softmax temperature T (default: {D.temperature:g})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: sgd for linear-probe, adamw for full")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: 0.01 for sgd, 2e-4 for adamw, {SHALLOW_LR:g} for --depth/--blocks students, "
                        "2e-5 for a quantized student)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 1e-4 for sgd, 0.05 for adamw, 0 for a quantized student")
    p.add_argument("--momentum", type=float, default=D.momentum, help=f"SGD momentum (default: {D.momentum:g})")
    p.add_argument("--warmup", type=float, default=D.warmup, metavar="FRACTION",
                   help=f"fraction of the run in linear warm-up, then cosine decay to 0 (default: {D.warmup:g})")
    p.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="random-resized-crop area range, as timm's training transform (default: no crops; inverted images rarely keep their label under them)")
    p.add_argument("--shift-patches", type=int, default=D.shift_patches, metavar="N",
                   help=f"random circular shift by up to N whole patches each way (default: {D.shift_patches})")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    p.add_argument("--mix", choices=MIXES, default=None,
                   help="mix each sample with another image of the set (blend, or a pasted box); the teacher labels the mixed view "
                        f"(default: {SHALLOW_MIX} for --depth/--blocks students with online targets, {D.mix} otherwise)")
    p.add_argument("--mix-prob", type=float, default=D.mix_prob, metavar="P", help=f"fraction of the samples mixed (default: {D.mix_prob:g})")
    _add_term_options(p)
    p.add_argument("--targets", choices=TARGETS, default=D.targets,
                   help=f"online: the teacher labels every augmented view; cached: each image once (default: {D.targets})")
    p.add_argument("--seed", type=int, default=D.seed, help="seeds the fresh head, the crops and the shuffling")
    p.add_argument("--workers", type=int, default=D.workers, help="processes reading images (default: 0, in the training process)")
    p.add_argument("--views", type=int, default=None, help=argparse.SUPPRESS)  # replaced by fresh crops; still accepted
    p.add_argument("--val", help="real labelled folder <class>/<images> to evaluate on after every epoch")
    p.add_argument("--val-class-map", help="file whose line i starts with class i's folder name (default: ImageNet synset folders map "
                                           "by synset for 1000-class teachers; otherwise sorted folder order, when the counts match)")
    p.add_argument("--val-class-index", dest="val_class_map", action=Renamed, new="--val-class-map")
    p.add_argument("--val-num-images-per-class", type=int, help="evaluate on only the first N images of each class")
    add_renamed(p, ["--val-limit-per-class"], "--val-num-images-per-class", "val_num_images_per_class", type=int)
    p.add_argument("--invert-every", type=int, default=0, metavar="K", help="invert a new round of images from the teacher every K epochs (the first pool's settings)")
    p.add_argument("--num-images-per-round", type=int, default=0, metavar="M", help="images inverted per round")
    add_renamed(p, ["--images-per-round"], "--num-images-per-round", "num_images_per_round", type=int)
    p.add_argument("--round-disagreement", type=float, metavar="W",
                   help="weight of a term in each round's inversion that seeks images the teacher is sure of and the student "
                        "(as it stands at the round) is not: 1 - JS(teacher, student)/ln 2 (default 1; 0: plain rounds, "
                        "about 2.7x faster per image)")
    p.add_argument("--allow-other-weights", action="store_true", help="accept pools inverted from other weights than the teacher's")
    p.add_argument("--student-checkpoint", metavar="PATH", help="a --student's weights (default: timm's pretrained weights from the hub)")
    p.add_argument("--student-random-weights", dest="random_student", action="store_true", help="start a --student from random weights (no checkpoint)")
    add_renamed(p, ["--random-student"], "--student-random-weights", "random_student", nargs=0, const=True)
    add_quiet(p)
    add_device(p)
    p.set_defaults(func=run)


def load_teacher(name: str, checkpoint: str | None, device) -> tuple:
    """The teacher, with its class count read from the checkpoint's head."""
    from sparseinv.models import load_model

    return load_model(name, checkpoint, device=device), name, checkpoint


def load_student(name: str, checkpoint: str | None, device, random_weights: bool):
    """Any timm model; ViTs through :func:`load_model`, others by timm directly.

    The class count follows the checkpoint's classifier, so a 1000-class ImageNet
    checkpoint loads as such before its head is rebuilt.
    """
    import torch

    from sparseinv.distill import is_vit
    from sparseinv.models import check_model_name, checkpoint_shape, load_model, read_state_dict, state_mismatch, timm

    check_model_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights the same in every process of a run
        skeleton = timm.create_model(name, pretrained=False)
    if is_vit(skeleton):
        return load_model(name, checkpoint, device=device, pretrained=not random_weights), name
    if checkpoint is None:
        if random_weights:
            return skeleton.to(device).eval(), name
        return _hub(name, device), name
    state = read_state_dict(checkpoint)
    num_classes = checkpoint_shape(state, skeleton.default_cfg.get("classifier", "head")).get("num_classes")
    model = timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    mismatch = state_mismatch(model, state)
    if mismatch:
        raise UsageError(f"checkpoint '{checkpoint}' does not match model '{name}': {mismatch}.")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), name


def _hub(name: str, device):
    from sparseinv.models import timm

    try:
        return timm.create_model(name, pretrained=True).to(device).eval()
    except Exception as err:  # hub errors come in many types; all mean "no weights"
        raise UsageError(f"could not fetch pretrained weights for '{name}' ({type(err).__name__}); pass --student-checkpoint PATH.") from None


def make_student(args: argparse.Namespace, teacher, teacher_name: str, device):
    """The student the arguments name, and the timm name it saves as."""
    from sparseinv.distill import shallow_copy, spread_blocks

    if args.student:
        return load_student(*model_and_checkpoint(args.student, args.student_checkpoint, "--student"), device, args.random_student)
    if args.random_student or args.student_checkpoint:
        raise UsageError("--student-random-weights and --student-checkpoint go with --student only: --depth, --blocks and "
                         "--quantized start from the teacher.")
    if args.quantized:
        from sparseinv.quant import load_quantized

        return load_quantized(copy.deepcopy(teacher), args.quantized, teacher_name), teacher_name
    blocks = args.blocks if args.blocks else spread_blocks(len(teacher.blocks), args.depth)
    return shallow_copy(teacher, blocks), teacher_name


def student_kind(args: argparse.Namespace) -> str:
    """Which of :data:`~sparseinv.distill.config.STUDENT_KINDS` the options ask for."""
    if args.quantized:
        return "quantized"
    return "depth" if args.depth is not None or args.blocks else "timm"


def config_from(args: argparse.Namespace) -> DistillConfig:
    """The run's settings: :meth:`DistillConfig.for_student`'s defaults for the student, under what was given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
             if getattr(args, f.name, None) is not None}
    if args.crop_scale is not None:
        given["crop_scale"] = tuple(args.crop_scale)
    return DistillConfig.for_student(student_kind(args), **given).validate()


def run(args: argparse.Namespace) -> int:
    from sparseinv import distributed
    from sparseinv.distill import is_vit
    from sparseinv.runs.inversion import pool_settings
    from sparseinv.runs.rounds import RoundsConfig, distill_with_rounds
    from sparseinv.pool import open_pools

    if args.views is not None:
        print("sparseinv: note: --views is no longer used: every epoch draws fresh random crops and flips "
              "(--crop-scale, --no-flip).", file=sys.stderr)
    config = config_from(args)
    if args.round_disagreement is not None and not args.invert_every:
        raise UsageError("--round-disagreement weighs a term of the rounds' inversion: it needs --invert-every.")
    rounds = RoundsConfig(args.invert_every, args.num_images_per_round,
                          **({} if args.round_disagreement is None else {"disagreement": args.round_disagreement})).validate()
    if len(args.pool) > 1 and rounds.invert_every:
        raise UsageError("--invert-every grows one pool: give a single --pool.")
    if args.quantized:
        from sparseinv.quant import read_header

        read_header(args.quantized)  # a wrong file fails before any model loads
    check_writable(args.out)
    teacher_name, teacher_ckpt = model_and_checkpoint(args.teacher, args.teacher_checkpoint, "--teacher")
    # Before any model loads; distill() checks them again for the teacher's weights and classes.
    pools = open_pools(args.pool, teacher_name, role="teacher")
    if rounds.invert_every:
        pool_settings(pools[0])  # refuses a record whose settings a round cannot rebuild
    if args.val:
        from sparseinv.data import ImageFolder

        val_folders = ImageFolder.class_folders(args.val)
    device = resolve_device(args)
    teacher, teacher_name, teacher_ckpt = load_teacher(teacher_name, teacher_ckpt, device)
    val = None
    if args.val:
        from sparseinv.classes import folder_class_index

        index, _ = folder_class_index(val_folders, teacher.num_classes, args.val_class_map, f"--val '{args.val}'")
        val = ImageFolder.scan(args.val, index, limit_per_class=args.val_num_images_per_class)
    student, student_name = make_student(args, teacher, teacher_name, device)
    if pools[0].is_sparse and not is_vit(student):
        print(f"sparseinv: note: the student {student_name} is not a token-sequence ViT: it sees the sparse images whole, "
              "stopped patches black.", file=sys.stderr)
    common = dict(teacher_name=teacher_name, student_name=student_name, allow_other_weights=args.allow_other_weights, progress=not args.quiet)
    if rounds.invert_every:
        summary = distill_with_rounds(teacher, student, args.pool[0], config, rounds, args.out, val, teacher_checkpoint=teacher_ckpt, **common)
    else:
        from sparseinv.distill import distill

        summary = distill(teacher, student, pools, config, args.out, val, **common)
    if not distributed.current().is_main:
        return 0
    val_text = f" | val top-1 last {summary['final_val_top1']:.2f}, best {summary['best_val_top1']:.2f} (epoch {summary['best_epoch']})" \
        if summary["final_val_top1"] is not None else ""
    print(
        f"{config.mode} distillation: {summary['epoch']} epochs on {summary['num_images']} images | "
        f"{summary['train_seconds']:.1f} s training{val_text} -> {args.out}"
    )
    return 0
