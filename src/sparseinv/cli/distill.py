"""``sparseinv distill``: train a student on a pool with a teacher's soft labels."""

from __future__ import annotations

import argparse

import torch

from sparseinv.cli.common import add_device, config_from_args, resolve_device, split_model_spec
from sparseinv import distributed
from sparseinv.distill import MODES, DistillConfig, checkpoint_num_classes, distill, is_vit
from sparseinv.errors import UsageError, first_line
from sparseinv.files import check_writable
from sparseinv.models import load_model, timm
from sparseinv.pool import read_pool


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a teacher into a student on a pool of synthetic images",
        description=(
            "Train a student on a pool's images with the teacher's soft labels: loss = T^2 * KL(softmax(teacher/T) || "
            "softmax(student/T)). Sparse images reach both models as their kept tokens only."
        ),
    )
    p.add_argument("--teacher", required=True, metavar="NAME[:CHECKPOINT]", help="the model the pool was inverted from")
    p.add_argument("--student", required=True, metavar="NAME[:CHECKPOINT]", help="the model to train (its head is rebuilt to the teacher's classes)")
    p.add_argument("--pool", required=True, help="pool folder written by 'sparseinv invert' from the teacher")
    p.add_argument("--out", required=True, help="student weights (.safetensors); .best.safetensors, .last.pt and .json go beside it")
    p.add_argument("--mode", choices=MODES, default="linear-probe", help="linear-probe: frozen backbone, fresh head (default); full: all weights")
    p.add_argument("--epochs", type=int, default=10, help="passes over the pool")
    p.add_argument("--batch-size", type=int, default=64, help="images (views) per SGD step")
    p.add_argument("--temperature", type=float, default=20.0, help="softmax temperature T (default 20)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.01 for linear-probe, 0.001 for full; the paper's 0.1 diverged here with T=20 and the T^2 factor)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--seed", type=int, default=0, help="seeds the fresh head, the views and the shuffling")
    p.add_argument("--views", type=int, default=8, help="views per image: itself, then rolls by whole patches and mirrors, each labelled by the teacher (default 8; 1: no augmentation)")
    p.add_argument("--val", help="real labelled folder <class>/<images> to evaluate on after every epoch")
    p.add_argument("--val-class-index", help="file whose line i starts with class i's folder name, e.g. imagenet_synsets.txt (default: sorted folder order)")
    p.add_argument("--val-limit-per-class", type=int, help="evaluate on only the first N images of each class")
    p.add_argument("--invert-every", type=int, default=0, metavar="K", help="invert new images from the teacher every K epochs")
    p.add_argument("--images-per-round", type=int, default=0, metavar="M", help="images inverted per round")
    p.add_argument("--random-student", action="store_true", help="start the student from random weights (no checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device(p)
    p.set_defaults(func=run)


def load_teacher(spec: str, device) -> tuple:
    """The teacher, with its class count read from the checkpoint's head."""
    name, checkpoint = split_model_spec(spec)
    num_classes = checkpoint_num_classes(checkpoint) if checkpoint else None
    return load_model(name, checkpoint, device=device, num_classes=num_classes), name, checkpoint


def load_student(spec: str, device, random_weights: bool):
    """Any timm model; ViTs through :func:`load_model`, others by timm directly.

    The class count follows the checkpoint's classifier, so a 1000-class ImageNet
    checkpoint loads as such before its head is rebuilt.
    """
    name, checkpoint = split_model_spec(spec)
    if name not in timm.list_models() and name not in timm.list_pretrained():
        raise UsageError(f"unknown model '{name}': not a timm model name (see timm.list_models()).")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights the same in every process of a run
        skeleton = timm.create_model(name, pretrained=False)
    classifier = skeleton.default_cfg.get("classifier", "head")
    num_classes = checkpoint_num_classes(checkpoint, classifier) if checkpoint else None
    if is_vit(skeleton):
        return load_model(name, checkpoint, device=device, num_classes=num_classes, pretrained=not random_weights), name
    if checkpoint is None:
        if random_weights:
            return skeleton.to(device).eval(), name
        return _hub(name, device), name
    from sparseinv.models import read_state_dict

    model = timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    state = read_state_dict(checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as err:
        first = first_line(err)
        raise UsageError(f"checkpoint '{checkpoint}' does not match model '{name}': {first}") from None
    return model.to(device).eval(), name


def _hub(name: str, device):
    try:
        return timm.create_model(name, pretrained=True).to(device).eval()
    except Exception as err:  # hub errors come in many types; all mean "no weights"
        raise UsageError(f"could not fetch pretrained weights for '{name}' ({type(err).__name__}); pass NAME:CHECKPOINT.") from None


def run(args: argparse.Namespace) -> int:
    config = config_from_args(DistillConfig, args)
    config.validate()  # cheap mistakes first, before any model loads
    check_writable(args.out)
    pool = read_pool(args.pool)  # refuses a missing or empty pool
    teacher_name, _ = split_model_spec(args.teacher)
    pool.check_model(teacher_name, "teacher")
    val = None
    if args.val:
        from sparseinv.data import ImageFolder, read_class_index

        index = read_class_index(args.val_class_index) if args.val_class_index else None
        val = ImageFolder.scan(args.val, index, limit_per_class=args.val_limit_per_class)
    device = resolve_device(args)
    teacher, teacher_name, teacher_ckpt = load_teacher(args.teacher, device)
    student, student_name = load_student(args.student, device, args.random_student)
    if pool.is_sparse and not is_vit(student):
        raise UsageError(
            f"the student {student_name} is not a token-sequence ViT, so it cannot take the sparse pool's images as kept "
            "tokens; use a dense pool or a ViT student."
        )
    summary = distill(
        teacher, student, pool, config, args.out, val,
        teacher_name=teacher_name, student_name=student_name, teacher_checkpoint=teacher_ckpt, progress=not args.quiet,
    )
    if not distributed.current().is_main:
        return 0
    val_text = f" | val top-1 last {summary['final_val_top1']:.2f}, best {summary['best_val_top1']:.2f} (epoch {summary['best_epoch']})" \
        if summary["final_val_top1"] is not None else ""
    print(
        f"{config.mode} distillation: {summary['epoch']} epochs on {summary['num_images']} images | "
        f"{summary['train_seconds']:.1f} s training{val_text} -> {args.out}"
    )
    return 0
