"""Arguments and checks several sub-commands share."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from sparseinv.errors import UsageError

if TYPE_CHECKING:
    import torch


class Renamed(argparse.Action):
    """An option's old spelling: still accepted, with a one-line note, into the new option's value.

    The new spelling wins when both are given, whatever their order (unless it is given
    at its default value, which the old spelling then replaces).
    """

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string} is now {self.new}.", file=sys.stderr)
        if getattr(namespace, self.dest, None) in (None, parser.get_default(self.dest)):
            setattr(namespace, self.dest, self.const if self.nargs == 0 else values)  # nargs=0: a flag


def add_renamed(parser: argparse.ArgumentParser, old: list[str], new: str, dest: str, **kwargs) -> None:
    """Accept the older spellings ``old`` of option ``new`` (whose value goes to ``dest``)."""
    parser.add_argument(*old, dest=dest, action=Renamed, new=new, **kwargs)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print only the result: no progress bars, no exporter notes")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def resolve_device(args: argparse.Namespace) -> "torch.device":
    """The requested device, refused clearly if this machine does not have it."""
    import torch

    from sparseinv import distributed

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"unknown device '{args.device}': use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device on this machine.")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device '{args.device}': use cpu, cuda or cuda:N.")
    rank = distributed.current()
    if device.type == "cuda" and device.index is None and rank.active:
        device = torch.device("cuda", rank.local_rank)  # one GPU per process under torchrun
    return device


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """``NAME[:CHECKPOINT]`` to (name, checkpoint or None)."""
    prefix = "hf-hub:" if spec.startswith("hf-hub:") else ""
    name, _, checkpoint = spec[len(prefix):].partition(":")
    return prefix + name, (checkpoint or None)


def model_and_checkpoint(spec: str, checkpoint: str | None, option: str) -> tuple[str, str | None]:
    """``option NAME`` with ``option-checkpoint PATH``, or the older ``option NAME:CHECKPOINT`` (with a note)."""
    name, inline = split_model_spec(spec)
    if inline is None:
        return name, checkpoint
    if checkpoint is not None:
        raise UsageError(f"{option} {spec} names a checkpoint and so does {option}-checkpoint: give it once, as {option}-checkpoint.")
    print(f"note: {option} NAME:CHECKPOINT is now {option} NAME {option}-checkpoint CHECKPOINT.", file=sys.stderr)
    return name, inline


def add_model(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--checkpoint`` and ``--random-weights``."""
    parser.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
    parser.add_argument("--checkpoint", help=".safetensors or .pth weights (default: timm's pretrained weights from the hub)")
    parser.add_argument("--random-weights", action="store_true", help="keep random weights (speed tests only)")
    parser.add_argument("--num-classes", type=int, default=None, help="the classifier's size (default: the checkpoint's own)")


def model_from_args(args: argparse.Namespace, device: "torch.device"):
    """The model :func:`add_model`'s arguments name, on ``device``."""
    from sparseinv.models import load_model

    if args.checkpoint and args.random_weights:
        raise UsageError("give --checkpoint or --random-weights, not both.")
    return load_model(args.model, args.checkpoint, device=device, pretrained=not args.random_weights, num_classes=args.num_classes)


def config_from_args(cls, args: argparse.Namespace, **converted):
    """A dataclass config from the parsed arguments named like its fields.

    Fields without an argument keep their defaults; ``converted`` gives the fields
    whose argument needs converting first (lists to tuples, flags to objects).
    """
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **converted})
