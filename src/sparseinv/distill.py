"""Data-free knowledge transfer: train a student on a pool with a teacher's soft labels.

SPEC section 6. The student learns from the teacher's logits on pool images only:

    loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the batch (Hinton et al.'s scaling: the T^2 keeps the gradient size
independent of T, so the paper's T = 20 works with the usual learning rates).

Two modes:

* ``linear-probe`` (the paper's protocol): the student's backbone is frozen and a
  fresh head sized to the teacher's classes is trained with SGD (momentum 0.9,
  weight decay 1e-4). The frozen backbone's features and the teacher's logits are a
  fixed function of each view (below): both are computed once and the epochs train
  the head on them (exactly what feeding the views every epoch would compute, at a
  fraction of the cost).
* ``full``: every weight of the student is trained; the student sees the views every
  step (the teacher's logits are still computed once).

Views: every pool image is also shown rolled by whole patches and mirrored
(``views`` in all, the image itself first), each labelled by the teacher on that
view. A small pool needs them: a 10-image sparse pool taught a linear probe 63% on
real images alone and 95% with 8 views (``benchmarks/distill.py``). Shifts are whole
patches, so a sparse image's kept patches follow its pixels exactly
(:meth:`sparseinv.augment.RollFlip.remap`).

Sparse pool images reach both models as their kept tokens only, through
:func:`sparseinv.sparse_forward`; a student that is not a token-sequence ViT can only
learn from dense pools. Each model gets the pool's pixels normalised with its own
mean and std.

Files beside ``out`` (``student.safetensors``):

* ``student.safetensors``: the student after the last epoch (+ ``student.json``:
  model, num_classes, epoch, val accuracy, history).
* ``student.best.safetensors``: the best epoch by val top-1 (by training loss without
  ``val``).
* ``student.last.pt``: weights, optimiser state, epoch and history after every epoch;
  an interrupted run resumes from it and ends with the weights an uninterrupted run
  would have.
* ``student.rounds/round_NNN/``: pools inverted during training (``invert_every``).

Under ``torchrun`` (several processes, :mod:`sparseinv.distributed`) the trained
module is wrapped in DistributedDataParallel. Each epoch's shuffled order is one
:class:`~torch.utils.data.DistributedSampler` permutation, of which every rank takes
its share; a rank trains on ``batch_size / P`` images per step, so the global batch,
the averaged gradient and the weights are those of one process with ``batch_size``
(up to float rounding). The teacher's logits and the frozen features are computed
once, each rank a slice. Rank 0 evaluates, saves and prints.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from sparseinv import distributed
from sparseinv.augment import MAX_VIEWS, RollFlip, whole_patch_views
from sparseinv.augment import whole_patch_views as distill_views  # noqa: F401  (its name here before it moved)
from sparseinv.errors import UsageError
from sparseinv.files import atomic_save, atomic_write_json
from sparseinv.models import vit_info
from sparseinv.pool import Pool
from sparseinv.sparse_forward import sparse_forward

MODES = ("linear-probe", "full")
# Default learning rates per mode. The paper's linear probe uses 0.1, but with T=20
# and the T^2 factor that diverged on DeiT-Tiny features (norm ~23): the training loss
# went from 6.9 to 713 on real images. 0.01 trains stably; the full mode uses a
# gentler rate still, since it moves a whole pretrained backbone.
DEFAULT_LR = {"linear-probe": 0.01, "full": 0.001}
# Views are rolls by up to this many whole patches each way, with or without a mirror.


@dataclass
class DistillConfig:
    """Settings of a distillation run.

    Attributes:
        mode: ``linear-probe`` (frozen backbone, fresh head) or ``full`` (all weights).
        epochs: Passes over the pool (a grown pool counts its new images too).
        batch_size: Images per SGD step.
        temperature: Softmax temperature T of the KL loss (the paper: 20).
        lr: SGD learning rate; ``None`` uses :data:`DEFAULT_LR` for the mode.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        seed: Seeds the fresh head, the choice of views and the per-epoch shuffling.
        views: How many views of each image are trained on: the image itself, then
            distinct rolls by whole patches (up to two each way) with or without a
            mirror, each labelled by the teacher (1: the images alone).
        invert_every: Every this many epochs, invert new images from the teacher and
            add them to the pool (0: never).
        images_per_round: How many images each such round inverts.
    """

    mode: str = "linear-probe"
    epochs: int = 10
    batch_size: int = 64
    temperature: float = 20.0
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    views: int = 8
    invert_every: int = 0
    images_per_round: int = 0

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.mode] if self.lr is None else self.lr

    def validate(self) -> None:
        """Raise :class:`UsageError` for settings no run could use."""
        if self.mode not in MODES:
            raise UsageError(f"unknown mode '{self.mode}': use {' or '.join(MODES)}.")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not 1 <= self.views <= MAX_VIEWS:
            raise UsageError(f"--views {self.views} is out of range: use 1 to {MAX_VIEWS}.")
        if not self.temperature > 0:
            raise UsageError(f"the temperature must be positive, got {self.temperature}.")
        if not self.learning_rate > 0:
            raise UsageError(f"the learning rate must be positive, got {self.learning_rate}.")
        if self.invert_every < 0 or self.images_per_round < 0:
            raise UsageError("--invert-every and --images-per-round cannot be negative.")
        if (self.invert_every > 0) != (self.images_per_round > 0):
            raise UsageError("--invert-every and --images-per-round go together: give both or neither.")

    def record(self) -> dict:
        out = asdict(self)
        out["lr"] = self.learning_rate
        return out


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge-distillation loss: ``T^2 * KL(p_teacher^T || p_student^T)``, batch mean.

    Args:
        student_logits: (B, C) student outputs.
        teacher_logits: (B, C) teacher outputs (no gradient needed).
        temperature: T; both distributions are ``softmax(logits / T)``.

    Returns:
        A scalar tensor.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


# ---------------------------------------------------------------- models and inputs


def checkpoint_num_classes(path: str | os.PathLike, classifier: str = "head") -> int | None:
    """The class count of a checkpoint, read from its classifier weight's shape.

    Args:
        path: A ``.safetensors`` or ``.pth`` file with timm key names.
        classifier: The classifier's module path (``head`` for timm ViTs).

    Returns:
        Rows of ``<classifier>.weight``, or ``None`` if the checkpoint has no such key.
    """
    from sparseinv.models import read_state_dict

    key = f"{classifier}.weight"
    state = read_state_dict(path)
    return int(state[key].shape[0]) if key in state and state[key].dim() >= 1 else None


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a token-sequence ViT that :func:`sparse_forward` can feed."""
    try:
        vit_info(model)
    except UsageError:
        return False
    return True


def _norm_stats(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    from sparseinv.models import timm

    cfg = timm.data.resolve_data_config(model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return mean, std, tuple(cfg["input_size"][1:])


class _Feeder:
    """Feeds pool pixels to one model: its own normalisation, kept tokens only.

    Sparse images go through :func:`sparse_forward` with their kept patch indices;
    dense images of another size than the model's are resized (a sparse image cannot
    be: its kept indices name cells of the pool's patch grid).
    """

    def __init__(self, model: nn.Module, role: str, pool_size: tuple[int, int], sparse: bool, pool_grid: tuple[int, int]) -> None:
        self.model, self.role = model, role
        self.vit = is_vit(model)
        name = type(model).__name__
        if sparse and not self.vit:
            raise UsageError(
                f"the {role} {name} is not a token-sequence ViT, so it cannot take the pool's sparse images as kept "
                "tokens; use a dense pool or a ViT."
            )
        mean, std, size = _norm_stats(model)
        if sparse:
            info = vit_info(model)
            if tuple(info.input_size[1:]) != tuple(pool_size) or tuple(info.grid_size) != tuple(pool_grid):
                raise UsageError(
                    f"the {role} takes {info.input_size[1]}x{info.input_size[2]} images in a {info.grid_size[0]}x{info.grid_size[1]} "
                    f"patch grid, but the sparse pool's images are {pool_size[0]}x{pool_size[1]} in a "
                    f"{pool_grid[0]}x{pool_grid[1]} grid."
                )
        self.size = size
        device = next(model.parameters()).device
        self.mean, self.std = mean.to(device), std.to(device)
        self.device = device

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def logits(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.normalise(images)
        if self.vit:
            return sparse_forward(self.model, x, None if keep is None else keep.to(self.device)).logits
        return self.model(x)

    def features(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Pre-logit features (what the classifier reads)."""
        x = self.normalise(images)
        if self.vit:
            with _headless(self.model):
                return sparse_forward(self.model, x, None if keep is None else keep.to(self.device)).logits
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@contextmanager
def _headless(model: nn.Module):
    """Swap a ViT's ``head`` for Identity, so :func:`sparse_forward` returns pre-logits."""
    head = model.head
    model.head = nn.Identity()
    try:
        yield
    finally:
        model.head = head


def prepare_student(student: nn.Module, num_classes: int, mode: str, seed: int = 0) -> nn.Module:
    """Give the student a fresh head sized to the teacher's classes where needed.

    ``linear-probe`` always starts from a fresh head (the paper's protocol); ``full``
    keeps the student's head if it already has the teacher's class count.
    """
    if mode == "linear-probe" or student.num_classes != num_classes:
        device = next(student.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same fresh head on every run and resume
            student.reset_classifier(num_classes)
        student.to(device)
    return student


def _trainable(student: nn.Module, mode: str) -> list[nn.Parameter]:
    head = list(student.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    for p in student.parameters():
        p.requires_grad_(mode == "full" or id(p) in head_ids)
    return [p for p in student.parameters() if p.requires_grad]


# ---------------------------------------------------------------- growing the pool


def _inversion_config(pool: Pool, num_images: int, seed: int):
    """The pool's own inversion settings with another image count and seed."""
    from sparseinv.inversion import InversionConfig
    from sparseinv.losses import InversionLoss
    from sparseinv.schedule import PruneSchedule

    s = dict(pool.run["settings"])
    loss = s.get("loss", {})
    if loss.get("extra"):
        raise UsageError(f"pool '{pool.root}' used extra loss terms that cannot be rebuilt from its record; cannot invert more like it.")
    return InversionConfig(
        num_images=num_images,
        batch_size=min(int(s["batch_size"]), num_images),
        iterations=int(s["iterations"]),
        lr=float(s["lr"]),
        betas=tuple(s["betas"]),
        schedule=PruneSchedule(tuple(s["schedule"]["steps"]), tuple(s["schedule"]["ratios"])),
        loss=InversionLoss(ce=loss.get("ce", 1.0), tv_l2=loss.get("tv_l2", 1e-4), tv_l1=loss.get("tv_l1", 0.0), l2=loss.get("l2", 0.0)),
        classes=None if s.get("classes") is None else tuple(s["classes"]),
        seed=seed,
        jitter=float(s.get("jitter", 0.125)),
        flip=bool(s.get("flip", True)),
    )


def _round_folder(out: Path, r: int) -> Path:
    return out.with_name(out.name.split(".")[0] + ".rounds") / f"round_{r:03d}"


# ---------------------------------------------------------------- files


def sibling(out: str | os.PathLike, suffix: str) -> Path:
    """``student.safetensors`` -> ``student<suffix>`` (e.g. ``.last.pt``, ``.best.safetensors``)."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.stem
    return out.with_name(stem + suffix)


def _save_student(student: nn.Module, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}))


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------- the loop


@torch.no_grad()
def _in_batches(fn: Callable, images: torch.Tensor, keep: torch.Tensor | None, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch], None if keep is None else keep[i : i + batch]) for i in range(0, len(images), batch)])


def _on_all_ranks(fn: Callable, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``fn`` on every image (on the CPU), each rank computing one contiguous slice."""
    rank = distributed.current()
    per = -(-len(images) // rank.world_size)
    lo, hi = rank.rank * per, min(len(images), (rank.rank + 1) * per)
    mine = _in_batches(fn, images[lo:hi], None if keep is None else keep[lo:hi]).cpu() if hi > lo else None
    return torch.cat([part for part in rank.all_gather(mine) if part is not None])


class _StudentLogits(nn.Module):
    """The student's logits on pool images, as a module DistributedDataParallel can wrap."""

    def __init__(self, feeder: _Feeder) -> None:
        super().__init__()
        self.student = feeder.model
        self._feeder = feeder

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self._feeder.logits(images, keep)


def _evaluate(student: nn.Module, feeder: _Feeder, val, progress: bool) -> dict:
    if callable(val):
        return val(student)
    from sparseinv.data import load_images

    student.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in tqdm(load_images(val, student, 64), desc="val", disable=not progress, leave=False):
            pred = (feeder.model(images.to(feeder.device)) if not feeder.vit else sparse_forward(student, images.to(feeder.device)).logits).argmax(1)
            correct += int((pred.cpu() == labels).sum())
            total += len(labels)
    return {"top1": 100.0 * correct / max(1, total), "num_images": total}


def distill(
    teacher: nn.Module,
    student: nn.Module,
    pool: Pool,
    config: DistillConfig,
    out: str | os.PathLike,
    val=None,
    *,
    teacher_name: str | None = None,
    student_name: str | None = None,
    teacher_checkpoint: str | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train ``student`` on ``pool`` with ``teacher``'s soft labels.

    Args:
        teacher: The model whose knowledge is transferred (eval mode, frozen).
        student: The model to train; its head is rebuilt to the teacher's classes
            (always in ``linear-probe``, when the counts differ in ``full``).
        pool: Synthetic images (see :func:`sparseinv.read_pool`); sparse ones are fed
            as kept tokens only.
        config: The run's settings.
        out: Where the final student goes (``.safetensors``); best, last and resume
            files go beside it (see the module docstring).
        val: A real :class:`sparseinv.data.ImageFolder` to evaluate on after every
            epoch, or a callable ``student -> {"top1": ...}``; ``None`` skips it.
        teacher_name: Checked against the pool's model when given.
        student_name: Recorded in the student's metadata.
        teacher_checkpoint: Recorded, and used for inversion rounds' run records.
        progress: Show a progress bar per epoch.
        on_epoch_end: Called with (epoch, record) after each epoch's checkpoint is
            safely on disk.

    Returns:
        A summary: history per epoch, best and final val top-1, wall times, files.

    Raises:
        UsageError: a pool from another model, or a student that cannot take it.
    """
    config.validate()
    rank = distributed.current()
    if config.batch_size % rank.world_size:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch and must divide evenly over the {rank.world_size} processes.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if teacher_name is not None:
        pool.check_model(teacher_name, "teacher")
    num_classes = int(teacher.num_classes)
    if int(pool.run.get("num_classes", num_classes)) != num_classes:
        raise UsageError(
            f"pool '{pool.root}' was inverted from a {pool.run['num_classes']}-class model, but the teacher has {num_classes} classes."
        )
    pool_size = tuple(pool.images.shape[-2:])
    pool_grid = tuple(int(pool_size[i]) // int(pool.run["patch_size"][i]) for i in range(2))
    grow = config.invert_every > 0
    # Rounds invert with the pool's own settings; they are sparse if the pool is.
    tokens_only = pool.is_sparse or (grow and bool(pool.run["settings"]["schedule"]["steps"]))
    teacher_feed = _Feeder(teacher, "teacher", pool_size, tokens_only, pool_grid)
    student_feed = _Feeder(student, "student", pool_size, tokens_only, pool_grid)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    prepare_student(student, num_classes, config.mode, config.seed)
    params = _trainable(student, config.mode)
    optimizer = torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
    linear = config.mode == "linear-probe"
    num_patches = int(pool.run["num_patches"])
    patch_size = tuple(int(p) for p in pool.run["patch_size"])
    views = whole_patch_views(config.views, patch_size, config.seed)

    # The data, per view of each image: pixels, kept tokens, the teacher's logits and
    # (linear probe) the frozen student's features, each computed once.
    images: list[torch.Tensor] = []
    keeps: list[torch.Tensor] = []
    teacher_logits: list[torch.Tensor] = []
    features: list[torch.Tensor] = []

    def add(new_images: torch.Tensor, new_keep: torch.Tensor) -> None:
        student.eval()
        for view in views:
            view_images = view.apply(new_images)
            view_keep = view.remap(new_keep, pool_grid, patch_size)
            keep = None if new_keep.shape[1] == num_patches else view_keep  # dense: the plain forward
            teacher_logits.append(_on_all_ranks(teacher_feed.logits, view_images, keep))
            if linear:
                features.append(_on_all_ranks(student_feed.features, view_images, keep))
            else:
                images.append(view_images)
                keeps.append(view_keep)

    add(pool.images, pool.kept_patches)

    settings = {
        "config": config.record(),
        "pool": str(Path(pool.root).resolve()),
        "pool_images": len(pool),
        "student": student_name,
        "teacher": teacher_name,
    }
    last_path = sibling(out, ".last.pt")
    best_path = sibling(out, ".best.safetensors")
    history: list[dict] = []
    best = {"epoch": None, "score": None}
    start_epoch = 0
    inversion_seconds = 0.0
    if last_path.is_file():
        try:
            state = torch.load(last_path, map_location="cpu", weights_only=False)
            saved = dict(state["settings"])
        except Exception as err:  # a damaged pickle fails in many ways
            raise UsageError(f"resume checkpoint '{last_path}' is damaged ({type(err).__name__}); delete it to start afresh.") from None
        # More epochs may be asked for when resuming; everything else must match.
        if {**saved, "config": {**saved["config"], "epochs": None}} != {**settings, "config": {**settings["config"], "epochs": None}}:
            raise UsageError(f"'{last_path}' belongs to a run with other settings; delete it or choose another --out.")
        try:
            student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history, best = state["epoch"], state["history"], state["best"]
        except (KeyError, RuntimeError, ValueError) as err:
            raise UsageError(f"resume checkpoint '{last_path}' is damaged ({type(err).__name__}); delete it to start afresh.") from None
        inversion_seconds = state.get("inversion_seconds", 0.0)

    def invert_round(r: int) -> float:
        from sparseinv.inversion import invert

        cfg = _inversion_config(pool, config.images_per_round, seed=int(pool.run["settings"]["seed"]) + 1000 + r)
        result = invert(teacher, cfg, str(_round_folder(out, r)), model_name=pool.model_name,
                        checkpoint=teacher_checkpoint or pool.run.get("checkpoint"), progress=progress)
        add(result.images, result.kept_patches)
        return float(result.run["wall_seconds"])

    if grow:  # rounds run before an interruption: their pools are complete and are re-read, not redone
        for e in range(config.invert_every, start_epoch, config.invert_every):
            invert_round(e // config.invert_every)

    meta_base = {"model": student_name, "num_classes": num_classes, "teacher": teacher_name, "mode": config.mode}
    # What the optimiser trains, called on a batch: the head on frozen features, or the whole student.
    trained: nn.Module = student.get_classifier() if linear else _StudentLogits(student_feed)
    if rank.active:
        trained = DistributedDataParallel(trained, find_unused_parameters=not linear)
    local_batch = config.batch_size // rank.world_size
    for epoch in range(start_epoch, config.epochs):
        if grow and epoch > 0 and epoch % config.invert_every == 0:
            inversion_seconds += invert_round(epoch // config.invert_every)
        epoch_start = time.time()
        t_logits = torch.cat(teacher_logits)
        n = len(t_logits)
        # Seeded by epoch alone, so a resumed run shuffles exactly as an uninterrupted one;
        # rank r takes every P-th of the permutation, so step k's global batch is the same slice for any P.
        sampler = DistributedSampler(range(n), num_replicas=rank.world_size, rank=rank.rank, shuffle=True, seed=config.seed * 1_000_003)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        if linear:
            feats = torch.cat(features)
        else:
            all_images, all_keep = torch.cat(images), torch.cat(keeps)
        trained.train(not linear)
        total = 0.0
        bar = tqdm(range(0, len(order), local_batch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and rank.is_main), leave=False)
        for i in bar:
            idx = order[i : i + local_batch]
            if linear:
                s_logits = trained(feats[idx].to(student_feed.device))
            else:
                keep = None if all_keep.shape[1] == num_patches else all_keep[idx]
                s_logits = trained(all_images[idx], keep)
            loss = kd_loss(s_logits, t_logits[idx].to(s_logits.device), config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        student.eval()
        total = rank.sum(total)
        record = {"epoch": epoch + 1, "loss": total / len(order) / rank.world_size, "num_images": n // len(views), "num_views": n,
                  "seconds": time.time() - epoch_start}
        history.append(record)
        if not rank.is_main:  # rank 0 evaluates, keeps the best and writes the files
            continue
        if val is not None:
            record["val_top1"] = float(_evaluate(student, student_feed, val, progress)["top1"])
        # Best by val top-1 when there is a val set, else by training loss.
        score = record["val_top1"] if val is not None else -record["loss"]
        if best["score"] is None or score > best["score"]:
            best = {"epoch": epoch + 1, "score": score, "val_top1": record.get("val_top1")}
            _save_student(student, best_path, {**meta_base, "epoch": epoch + 1, "val_top1": record.get("val_top1")})
        _atomic_torch_save(
            {"settings": settings, "epoch": epoch + 1, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
             "history": history, "best": best, "inversion_seconds": inversion_seconds},
            last_path,
        )
        if progress:
            val_text = f" | val top-1 {record['val_top1']:.2f}" if "val_top1" in record else ""
            print(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f} on {n // len(views)} images x {len(views)} views{val_text}", flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    final = history[-1] if history else {}
    meta = {**meta_base, "epoch": len(history), "val_top1": final.get("val_top1")}
    if rank.is_main:
        _save_student(student, out, meta)
    summary = {
        **meta,
        "out": str(out),
        "best": str(best_path),
        "last": str(last_path),
        "best_epoch": best["epoch"],
        "best_val_top1": best.get("val_top1"),
        "final_val_top1": final.get("val_top1"),
        "num_images": final.get("num_images", len(pool)),
        "train_seconds": sum(r["seconds"] for r in history),
        "inversion_seconds": inversion_seconds,
        "settings": settings,
        "history": history,
        "world_size": rank.world_size,
    }
    if rank.is_main:
        atomic_write_json(sibling(out, ".json"), summary)
    rank.barrier()  # every rank returns once the files are there
    return summary
