"""The models distillation trains, and how pool pixels reach them.

Three kinds of student, all plain timm modules:

* any timm classifier (heads through timm's ``get_classifier``/``reset_classifier``, so a
  distilled DeiT's two heads are both rebuilt and trained);
* :func:`shallow_copy`: the teacher with a chosen subset of its blocks, initialised from
  the teacher's weights (a smaller, faster model);
* a model returned by :func:`sparseinv.quant.quantize_` (quantization-aware training:
  :func:`sparseinv.quant.qat.start_qat` makes its latent weights and step sizes trainable,
  :func:`~sparseinv.quant.qat.end_qat` fixes the integer codes again).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparseinv.errors import UsageError
from sparseinv.models import is_vit, timm, vit_info
from sparseinv.quant.model import is_quantized
from sparseinv.quant.qat import end_qat, qat_parameters, start_qat  # noqa: F401  (their older import path)
from sparseinv.vit.forward import OutputRecorder, logits


def classifiers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The model's classifier heads, through timm's API (a distilled DeiT has two)."""
    head = model.get_classifier()
    return tuple(head) if isinstance(head, (tuple, list)) else (head,)


def prepare_student(student: nn.Module, num_classes: int, mode: str, seed: int = 0) -> nn.Module:
    """Give the student a fresh head sized to the teacher's classes where needed.

    ``linear-probe`` always starts from a fresh head (the paper's protocol); ``full``
    keeps the student's head if it already has the teacher's class count.
    """
    if mode == "linear-probe" or student.num_classes != num_classes:
        if is_quantized(student):
            raise UsageError(f"a quantized student must already have the teacher's {num_classes} classes "
                             "and trains in full mode (its head is quantized with the rest).")
        device = next(student.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same fresh head on every run and resume
            student.reset_classifier(num_classes)
        student.to(device)
    return student


def spread_blocks(depth: int, keep: int) -> list[int]:
    """``keep`` block indices spread evenly over ``depth``, starting with the first block.

    12 -> 6 gives 0, 2, 4, 6, 8, 10 (every other block). The first block is the one that
    reads the patch embedding; DeiT-Tiny's copy that keeps it agrees with the teacher on
    held-out inverted images twice as often before training as the copy that keeps the
    last block instead (3.1% vs 1.6%; on real images 14.5% vs 0.5%).
    """
    if not 1 <= keep <= depth:
        raise UsageError(f"--depth {keep} is out of range: the teacher has {depth} blocks.")
    return [(i * depth) // keep for i in range(keep)]


def shallow_copy(model: nn.Module, blocks: Sequence[int]) -> nn.Module:
    """A copy of a ViT that keeps ``blocks`` (indices, in order), with the teacher's weights.

    Everything else (embeddings, norm, head) is copied as it is. The copy saves and loads as
    the same timm model at ``depth=len(blocks)`` (:func:`sparseinv.models.load_model` reads
    the depth from the checkpoint).
    """
    depth = len(model.blocks)
    if not blocks or any(not 0 <= b < depth for b in blocks) or len(set(blocks)) != len(blocks):
        raise UsageError(f"--blocks must name distinct blocks 0..{depth - 1}, got {list(blocks)}.")
    student = copy.deepcopy(model)
    student.blocks = nn.Sequential(*[student.blocks[b] for b in blocks])
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def trainable(student: nn.Module, mode: str, qat_learn: str = "all") -> list[nn.Parameter]:
    """Mark and return what trains: the heads (linear probe), or every weight.

    A quantized student trains what ``qat_learn`` names of its latent weights and step
    sizes (:func:`qat_parameters`): its biases and norms stay those of the model its
    quantized file was made for, so the saved file still loads on that model.
    """
    if is_quantized(student):
        keep = {id(p) for p in qat_parameters(student, qat_learn)}
    elif mode == "linear-probe":
        keep = {id(p) for head in classifiers(student) for p in head.parameters()}
    else:
        keep = {id(p) for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in student.parameters() if p.requires_grad]


# ---------------------------------------------------------------- feeding pool pixels


class Feeder:
    """Feeds [0, 1] pixels to one model: its own normalisation, kept tokens where it can take them.

    A ViT whose input size and patch grid are the images' takes a sparse image as its
    kept tokens only (:func:`sparse_forward`); any other model gets the whole image
    (resized to its input size), stopped patches black.
    """

    def __init__(self, model: nn.Module, size: tuple[int, int], patch_size: tuple[int, int]) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.vit = is_vit(model)
        if self.vit:  # read from the model itself (its patch embedding's size), not its pretrained config
            info = vit_info(model)
            mean, std, self.size = info.mean, info.std, tuple(info.input_size[1:])
            self.takes_tokens = self.size == tuple(size) and tuple(info.patch_size) == tuple(patch_size)
        else:
            cfg = timm.data.resolve_data_config(model=model)
            mean, std, self.size = cfg["mean"], cfg["std"], tuple(cfg["input_size"][1:])
            self.takes_tokens = False
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def logits(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.normalise(images)
        if self.vit:
            tokens = keep.to(self.device) if keep is not None and self.takes_tokens else None
            return logits(self.model, x, tokens)
        return self.model(x)


def matched_blocks(student_depth: int, teacher_depth: int) -> list[int]:
    """For each student block, the teacher block whose output it should reproduce.

    Proportional depth: student block ``i`` stands for teacher blocks up to
    ``(i + 1) * teacher_depth / student_depth - 1``. For the every-other-block copy
    (blocks 0, 2, ..., 10 of 12) that is 1, 3, ..., 11: each kept block learns to do the
    work of itself and the dropped block after it. Equal depths pair block with block.
    """
    return [(i + 1) * teacher_depth // student_depth - 1 for i in range(student_depth)]


def feature_loss(student: OutputRecorder, teacher: OutputRecorder, mean=None) -> torch.Tensor:
    """Mean over the recorded pairs of the squared difference, each relative to the teacher's mean square.

    Relative, so a deep block whose residual stream is ten times larger weighs no more than
    an early one; for a single final-norm pair (unit-scale tokens) it is close to plain MSE.
    ``mean`` (``tensor -> scalar``, default ``Tensor.mean``) takes the teacher's mean square:
    under torchrun, over every process's tokens, so each process's share of the loss is the
    one process's loss on the whole batch.
    """
    terms = []
    for s, t in zip(student.values, teacher.values):
        t = t.to(s.device)
        square = t.detach().pow(2)
        terms.append(F.mse_loss(s, t) / (square.mean() if mean is None else mean(square)).clamp_min(1e-12))
    return torch.stack(terms).mean()


class StudentLogits(nn.Module):
    """The student's logits on a batch, as one module DistributedDataParallel can wrap."""

    def __init__(self, feeder: Feeder) -> None:
        super().__init__()
        self.student = feeder.model
        self._feeder = feeder

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self._feeder.logits(images, keep)
