"""The distillation loop: one epoch, evaluation, the checkpoint, and :func:`distill` tying them.

:func:`distill` trains a student on images that already exist (pools, or for a
reference real folders) with the teacher's soft labels; it never inverts. Growing the
pool between epochs is :func:`sparseinv.distill.rounds.distill_with_rounds`, a loop
around this one.

Files beside ``out``:

* ``out``: the student after the last epoch: a ``.safetensors`` state dict with the
  model name in its metadata, or, for a quantized student, a quantized file that
  ``sparseinv evaluate --quantized`` and ``sparseinv export`` read.
* ``<stem>.best.safetensors``: the best epoch by val top-1 (by training loss without val).
* ``<stem>.last.pt``: weights, optimiser state, epoch and history after every epoch; an
  interrupted run resumes from it and ends with the weights an uninterrupted run would.
* ``<stem>.json``: the run's summary.

Under ``torchrun`` the trained module is wrapped in DistributedDataParallel. Each
epoch's order is one :class:`~torch.utils.data.DistributedSampler` permutation of
which every rank takes its share, ``batch_size / P`` images a step, so the global batch
and the averaged gradient are those of one process. Rank 0 evaluates and saves.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from sparseinv import distributed
from sparseinv.distill.attention import attention_loss
from sparseinv.distill.config import DistillConfig, kd_loss
from sparseinv.distill.data import Source, TrainImages, loader
from sparseinv.distill.students import (
    Feeder,
    StudentLogits,
    feature_loss,
    is_vit,
    matched_blocks,
    prepare_student,
    trainable,
)
from sparseinv.errors import UsageError
from sparseinv.vit.forward import AttentionMaps, OutputRecorder
from sparseinv.files import atomic_save, atomic_write_json
from sparseinv.quant.model import is_quantized
from sparseinv.quant.qat import clamp_step_sizes, end_qat, start_qat


def sibling(out: str | os.PathLike, suffix: str) -> Path:
    """``student.safetensors`` -> ``student<suffix>`` (e.g. ``.last.pt``, ``.best.safetensors``)."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.stem
    return out.with_name(stem + suffix)


@dataclass
class Images:
    """What a run trains on: image files with their kept patches, and the shape to feed.

    Attributes:
        sources: The images, in a fixed order (the permutation indexes it).
        size: (height, width) fed to the models.
        patch_size: The grid the kept patches index.
        num_keep: Kept cells per image fed as tokens (``None``: fed whole).
        names: Where the images came from (pool folders), for the record.
    """

    sources: list[Source]
    size: tuple[int, int]
    patch_size: tuple[int, int]
    num_keep: int | None
    names: list[str] = field(default_factory=list)

    @classmethod
    def from_pools(cls, pools, teacher_name: str | None = None, teacher: nn.Module | None = None,
                   allow_other_weights: bool = False) -> "Images":
        """Every image of ``pools`` (folders, :class:`~sparseinv.pool.Pool` or
        :class:`~sparseinv.pool.PoolIndex`, one kind: sparse or dense), checked for the
        teacher by :func:`~sparseinv.pool.open_pools`.

        Sparse pools that keep different numbers of patches (a rescore pool beside a
        last-phase one) are fed the smallest count, so every batch stacks.
        """
        from sparseinv.distill.data import pool_sources
        from sparseinv.pool import open_pools

        pools = open_pools(pools, teacher_name, teacher, role="teacher", allow_other_weights=allow_other_weights)
        first = pools[0].record
        sources = pool_sources(pools)
        num_keep = min(p.num_kept for p in pools) if pools[0].is_sparse else None
        return cls(sources, tuple(first.input_size[1:]), tuple(first.patch_size), num_keep, [str(Path(p.root).resolve()) for p in pools])


# ---------------------------------------------------------------- the pieces


@torch.no_grad()
def cached_targets(teacher: Feeder, images: TrainImages, batch_size: int = 64) -> torch.Tensor:
    """The teacher's logits on every image, un-augmented, each rank a slice (``targets="cached"``)."""
    plain = copy.copy(images)
    plain.crop_scale, plain.shift_patches, plain.flip, plain.mix = None, 0, False, "none"
    rank = distributed.current()
    per = -(-len(plain) // rank.world_size)
    mine = range(rank.rank * per, min(len(plain), (rank.rank + 1) * per))
    parts = [teacher.logits(x, k if k.numel() else None).cpu() for x, k, _ in loader(plain, mine, batch_size)] if len(mine) else []
    gathered = rank.all_gather(torch.cat(parts) if parts else None)
    return torch.cat([g for g in gathered if g is not None])


def train_epoch(
    trained: nn.Module,
    teacher: Feeder,
    batches,
    optimizer: torch.optim.Optimizer,
    config: DistillConfig,
    *,
    epoch: int,
    steps: int,
    base_lrs: list[float],
    targets: torch.Tensor | None = None,
    after_step: Callable[[], None] | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """One pass: per batch, the teacher's targets, the KD loss, an optimiser step.

    The learning rate follows :meth:`DistillConfig.lr_factor` at fractional epochs, so
    the schedule does not depend on how many images a round added.

    Returns:
        (summed loss x images, images) seen by this process.
    """
    total, seen = 0.0, 0
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", total=steps, disable=not progress, leave=False)
    features = config.feature_weight > 0
    attention = config.attention_weight > 0
    rank = distributed.current()
    with contextlib.ExitStack() as stack:
        if features:
            student_tokens, teacher_tokens = _token_recorders(_unwrap(trained).student, teacher.model, config.feature_layers)
            stack.enter_context(student_tokens)
            stack.enter_context(teacher_tokens)
        if attention:
            student = _unwrap(trained).student
            student_maps = stack.enter_context(AttentionMaps(student))
            teacher_maps = stack.enter_context(AttentionMaps(teacher.model, matched_blocks(len(student.blocks), len(teacher.model.blocks))))
        for step, (images, keep, index) in enumerate(bar):
            factor = config.lr_factor(epoch + step / max(1, steps))
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            keep = keep if keep.numel() else None
            if targets is None:
                with torch.no_grad():
                    t_logits = teacher.logits(images, keep)
            else:
                t_logits = targets[index]
            s_logits = trained(images, keep)
            loss = kd_loss(s_logits, t_logits.to(s_logits.device), config.temperature)
            if features:
                loss = loss + config.feature_weight * feature_loss(student_tokens, teacher_tokens, rank.mean if rank.active else None)
            if attention:
                loss = loss + config.attention_weight * attention_loss(student_maps.maps, teacher_maps.maps, config.attention_form,
                                                                       teacher.model.num_prefix_tokens)
            total += _step(loss, optimizer, after_step) * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return total, seen


def _token_recorders(student: nn.Module, teacher: nn.Module, layers: str) -> tuple[OutputRecorder, OutputRecorder]:
    """Hooks on the student's and the teacher's tokens that the feature term compares."""
    if layers == "final":
        return OutputRecorder.final(student), OutputRecorder.final(teacher)
    return OutputRecorder.blocks(student), OutputRecorder.blocks(teacher, matched_blocks(len(student.blocks), len(teacher.blocks)))


def _check_run(config: DistillConfig):
    """Refuse settings no run could use here; this process's rank."""
    config.validate()
    rank = distributed.current()
    if config.batch_size % rank.world_size:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch and must divide evenly over the {rank.world_size} processes.")
    return rank


def _finish_student(student: nn.Module, out: Path, meta: dict, main: bool) -> None:
    """Save the trained student (rank 0); a quantized one is a plain quantized model again, as the file holds it."""
    if main:
        save_student(student, out, meta)
    if is_quantized(student):
        end_qat(student)


def _one_epoch(trained: nn.Module, teacher: Feeder, images: TrainImages, optimizer: torch.optim.Optimizer, config: DistillConfig,
               epoch: int, base_lrs: list[float], targets: torch.Tensor | None, progress: bool) -> dict:
    """Train one epoch on this process's share of the images; its record (loss over every process)."""
    rank = distributed.current()
    student = _unwrap(trained).student
    started = time.time()
    order = _epoch_order(len(images), epoch, config.seed, rank)
    images.set_epoch(epoch)
    local_batch = config.batch_size // rank.world_size
    student.train(config.mode == "full")
    total, seen = train_epoch(
        trained, teacher, loader(images, order, local_batch, config.workers), optimizer, config,
        epoch=epoch, steps=-(-len(order) // local_batch), base_lrs=base_lrs, targets=targets,
        after_step=(lambda: clamp_step_sizes(student)) if is_quantized(student) else None, progress=progress and rank.is_main,
    )
    student.eval()
    return {"epoch": epoch + 1, "loss": rank.sum(total) / max(1, rank.sum(seen)), "num_images": len(images),
            "seconds": time.time() - started}


def _feeds(teacher: nn.Module, student: nn.Module, data: Images, config: DistillConfig) -> tuple[Feeder, Feeder, TrainImages]:
    """How pool pixels reach the teacher and the student, and the images each epoch views afresh."""
    teacher_feed = Feeder(teacher, data.size, data.patch_size)
    student_feed = Feeder(student, data.size, data.patch_size)
    _check_comparable(config, student_feed, teacher_feed)
    num_keep = data.num_keep if (teacher_feed.takes_tokens or student_feed.takes_tokens) else None
    return teacher_feed, student_feed, TrainImages(data.sources, data.size, data.patch_size, num_keep, config.crop_scale,
                                                   config.shift_patches, config.flip, config.seed, config.mix, config.mix_prob)


def _report_epoch(record: dict, epochs: int, progress: bool) -> None:
    if progress:
        val_text = f" | val top-1 {record['val_top1']:.2f}" if "val_top1" in record else ""
        print(f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f} on {record['num_images']} images{val_text}", flush=True)


def _summary(meta: dict, out: Path, best_path: Path, last: Path, best: dict, history: list[dict], num_images: int,
             settings: dict, world_size: int) -> dict:
    """What :func:`distill` returns and writes beside ``out`` (``<stem>.json``)."""
    final = history[-1] if history else {}
    return {
        **meta,
        "epoch": len(history),
        "val_top1": final.get("val_top1"),
        "out": str(out),
        "best": str(best_path),
        "last": str(last),
        "best_epoch": best["epoch"],
        "best_val_top1": best.get("val_top1"),
        "final_val_top1": final.get("val_top1"),
        "num_images": final.get("num_images", num_images),
        "train_seconds": sum(r["seconds"] for r in history),
        "settings": settings,
        "history": history,
        "world_size": world_size,
    }


def _prepare_models(teacher: nn.Module, student: nn.Module, config: DistillConfig, num_classes: int,
                    quantized: bool) -> torch.optim.Optimizer:
    """Freeze the teacher, ready the student (head, QAT), mark what trains; the optimiser over it."""
    if quantized and config.mode != "full":
        raise UsageError("a quantized student trains in full mode (its latent weights and step sizes): pass --mode full.")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    prepare_student(student, num_classes, config.mode, config.seed)
    if quantized:  # a student still training from an earlier call (a round) is left as it is
        start_qat(student, config.qat_log_step_sizes)
    return _optimizer(trainable(student, config.mode, config.qat_learn), config, quantized)


def _check_comparable(config: DistillConfig, student: Feeder, teacher: Feeder) -> None:
    """Refuse the token and attention terms where the student's tokens or heads do not line up with the teacher's."""
    same_tokens = student.vit and student.takes_tokens == teacher.takes_tokens
    if config.feature_weight and not (same_tokens and getattr(student.model, "embed_dim", None) == getattr(teacher.model, "embed_dim", None)):
        raise UsageError("--feature-weight compares tokens: it needs a ViT student as wide as the teacher, on the same patch grid.")
    if config.attention_weight and not (same_tokens and _heads(student.model) == _heads(teacher.model)):
        raise UsageError("--attention-weight compares attention maps head by head: it needs a ViT student with the teacher's "
                         "heads per block, on the same patch grid.")


def _epoch_order(count: int, epoch: int, seed: int, rank) -> list[int]:
    """This process's share of the epoch's permutation.

    Seeded by epoch alone, so a resumed run shuffles exactly as an uninterrupted one; rank r
    takes every P-th of the permutation, so step k's global batch is the same slice for any P.
    """
    sampler = DistributedSampler(range(count), num_replicas=rank.world_size, rank=rank.rank, shuffle=True, seed=seed * 1_000_003)
    sampler.set_epoch(epoch)
    return list(sampler)


def _keep_best(student: nn.Module, record: dict, val, best: dict, best_path: Path, meta: dict, progress: bool) -> dict:
    """Score the epoch (val top-1, else the training loss), saving the student when it is the best so far."""
    if val is not None:
        record["val_top1"] = float(evaluate_student(student, val, progress)["top1"])
    score = record["val_top1"] if val is not None else -record["loss"]
    if best["score"] is None or score > best["score"]:
        best = {"epoch": record["epoch"], "score": score, "val_top1": record.get("val_top1")}
        save_student(student, best_path, {**meta, "epoch": record["epoch"], "val_top1": record.get("val_top1")})
    return best


def _heads(model: nn.Module) -> int | None:
    """Heads per attention block (``None`` when the blocks hold no timm-style attention)."""
    attn = getattr(model.blocks[0], "attn", None) if hasattr(model, "blocks") and len(model.blocks) else None
    return getattr(attn, "num_heads", None)


def _unwrap(trained: nn.Module) -> nn.Module:
    return trained.module if isinstance(trained, DistributedDataParallel) else trained


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, after_step: Callable[[], None] | None) -> float:
    """One optimiser step on ``loss``; returns its value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if after_step is not None:
        after_step()
    return loss.item()


def evaluate_student(student: nn.Module, val, progress: bool = False) -> dict:
    """Top-1 of ``student`` on a real :class:`~sparseinv.data.ImageFolder`, or ``val(student)``."""
    if callable(val):
        return val(student)
    from sparseinv.data import load_images, topk_accuracy
    from sparseinv.vit.forward import logits

    student.eval()
    device = next(student.parameters()).device
    # The student's own eval transform already resizes and normalises: feed its output as it is.
    if is_vit(student):
        def logits_of(x):
            return logits(student, x)
    else:
        def logits_of(x):
            return student(x.to(device))
    batches = load_images(val, student, 64)
    return topk_accuracy(logits_of, batches, total=len(batches), progress=progress, desc="val")


def _optimizer(params: list[nn.Parameter], config: DistillConfig, quantized: bool) -> torch.optim.Optimizer:
    lr, decay = config.learning_rate(quantized), config.decay(quantized)
    # Biases, norms, embeddings and step sizes (1-d tensors, timm's rule) are never decayed.
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer_name() == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=lr)


class Checkpoint:
    """The resume file (``<stem>.last.pt``): written after every epoch, read at the start.

    A run resumes only with the settings it was started with; more epochs may be asked
    for, and the image list may have grown (pool rounds) as long as it starts with the
    images the checkpoint was trained on.
    """

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.settings = path, settings

    def _comparable(self, settings: dict) -> dict:
        return {**settings, "config": {**settings["config"], "epochs": None}, "images": None}

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            saved = dict(state["settings"])
            same = self._comparable(saved) == self._comparable(self.settings)
            grown = self.settings["images"][: len(saved["images"])] == saved["images"]
        except Exception as err:  # a damaged pickle fails in many ways
            raise UsageError(f"resume checkpoint '{self.path}' is damaged ({type(err).__name__}); delete it to start afresh.") from None
        if not (same and grown):
            raise UsageError(f"'{self.path}' belongs to a run with other settings; delete it or choose another --out.")
        return state

    def resume(self, student: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict], dict]:
        """Load the saved state into ``student`` and ``optimizer``: (next epoch, history, best); a fresh start without one."""
        state = self.load()
        if state is None:
            return 0, [], {"epoch": None, "score": None}
        try:
            student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            return state["epoch"], state["history"], state["best"]
        except (KeyError, RuntimeError, ValueError) as err:
            raise UsageError(f"resume checkpoint '{self.path}' is damaged ({type(err).__name__}); delete it to start afresh.") from None

    def save(self, state: dict) -> None:
        atomic_save(self.path, lambda tmp: torch.save({"settings": self.settings, **state}, tmp))


def save_student(student: nn.Module, path: Path, meta: dict) -> None:
    """The student's weights (or, quantized, its quantized file) with ``meta`` recorded."""
    if is_quantized(student):
        from sparseinv.quant.io import save_quantized

        frozen = end_qat(copy.deepcopy(student))
        save_quantized(frozen, path, meta["model"])
        return
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}))


# ---------------------------------------------------------------- the run


def distill(
    teacher: nn.Module,
    student: nn.Module,
    images,
    config: DistillConfig,
    out: str | os.PathLike,
    val=None,
    *,
    teacher_name: str | None = None,
    student_name: str | None = None,
    until_epoch: int | None = None,
    allow_other_weights: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train ``student`` on ``images`` with ``teacher``'s soft labels.

    Args:
        teacher: The model whose knowledge is transferred (eval mode, frozen).
        student: The model to train: any timm classifier (its head is rebuilt to the
            teacher's classes where needed), a :func:`~sparseinv.distill.students.shallow_copy`
            of the teacher, or a model returned by :func:`~sparseinv.quant.quantize_`.
        images: A pool folder, a :class:`~sparseinv.pool.Pool` or
            :class:`~sparseinv.pool.PoolIndex`, a list of those, or an :class:`Images`.
        config: The run's settings.
        out: Where the final student goes; best, resume and summary files go beside it.
        val: A real :class:`sparseinv.data.ImageFolder` to evaluate on after every
            epoch, or a callable ``student -> {"top1": ...}``; ``None`` skips it.
        teacher_name: Checked against the pools' model when given; recorded.
        student_name: Recorded with the student (the timm name it loads as).
        allow_other_weights: Accept pools inverted from other weights than the teacher's.
        until_epoch: Stop after this epoch (the schedule still spans ``config.epochs``);
            a later call with the same ``out`` resumes.
        progress: Progress bars and one line per epoch.
        on_epoch_end: Called with (epoch, record) once the epoch's files are on disk.

    Returns:
        A summary: history per epoch, best and final val top-1, times, files.

    Raises:
        UsageError: pools from another model, a student that cannot learn from them,
            or a resume file from another run.
    """
    rank = _check_run(config)
    data = images if isinstance(images, Images) else Images.from_pools(images, teacher_name, teacher, allow_other_weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantized = is_quantized(student)
    optimizer = _prepare_models(teacher, student, config, int(teacher.num_classes), quantized)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    teacher_feed, student_feed, train_images = _feeds(teacher, student, data, config)
    settings = {"config": config.record(quantized), "images": data.names or [str(s.path) for s in data.sources],
                "student": student_name, "teacher": teacher_name, "quantized": quantized}
    checkpoint = Checkpoint(sibling(out, ".last.pt"), settings)
    best_path = sibling(out, ".best.safetensors")
    start_epoch, history, best = checkpoint.resume(student, optimizer)
    targets = cached_targets(teacher_feed, train_images) if config.targets == "cached" else None
    trained: nn.Module = StudentLogits(student_feed)
    if rank.active:
        trained = DistributedDataParallel(trained, find_unused_parameters=config.mode == "linear-probe")
    meta_base = {"model": student_name, "num_classes": int(teacher.num_classes), "teacher": teacher_name, "mode": config.mode}
    stop = config.epochs if until_epoch is None else min(config.epochs, until_epoch)
    for epoch in range(start_epoch, stop):
        record = _one_epoch(trained, teacher_feed, train_images, optimizer, config, epoch, base_lrs, targets, progress)
        history.append(record)
        if not rank.is_main:  # rank 0 evaluates, keeps the best and writes the files
            continue
        best = _keep_best(student, record, val, best, best_path, meta_base, progress)
        checkpoint.save({"epoch": epoch + 1, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                         "history": history, "best": best})
        _report_epoch(record, config.epochs, progress)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    if len(history) == config.epochs:
        _finish_student(student, out, {**meta_base, "epoch": len(history), "val_top1": history[-1].get("val_top1")}, rank.is_main)
    summary = _summary(meta_base, out, best_path, checkpoint.path, best, history, len(train_images), settings, rank.world_size)
    if rank.is_main:
        atomic_write_json(sibling(out, ".json"), summary)
    rank.barrier()  # every rank returns once the files are there
    return summary
