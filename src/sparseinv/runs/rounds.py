"""Growing the pool while distilling (the paper's rounds): invert, then train on more.

Every ``invert_every`` epochs a round inverts ``images_per_round`` new images from the
teacher, with the first pool's own recorded settings (:func:`~sparseinv.runs.inversion.pool_settings`,
every one of them: schedule, final mask, precision) and a seed of its own, into
``<stem>.rounds/round_NNN/``; training goes on over all pools so far. It is a run, not
part of distillation's engine, which never calls the inverter.

With ``disagreement`` a round's images are made for the student as it stands: the
inversion loss gains :class:`~sparseinv.inversion.losses.StudentDisagreement` against a
frozen copy of the student after the round's epochs (Adaptive DeepInversion's
competition term), so they are images the teacher is sure of and the student is not.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sparseinv.distill.config import DistillConfig
from sparseinv.distill.train import distill, sibling
from sparseinv.errors import UsageError
from sparseinv.inversion.losses import StudentDisagreement
from sparseinv.quant.qat import end_qat
from sparseinv.pool import open_pool
from sparseinv.runs.inversion import invert, pool_settings

# A round's seed is the first pool's plus this and the round number, so no round repeats its images.
ROUND_SEED_OFFSET = 1000
# The disagreement term's default weight: the W4/A4 DeiT-Tiny student from 64 sparse images and a round
# of 64 reached 51.0 top-1 on train100 with it, 48.5 with a plain round, 49.0 with a plain round of 192
# made in the same inversion time, 49.0 at weight 10 (benchmarks/qat_attention.py --stages rounds).
ROUND_DISAGREEMENT = 1.0


@dataclass
class RoundsConfig:
    """How the pool grows: every ``invert_every`` epochs, ``images_per_round`` new images (0: never),
    inverted with the teacher-student disagreement term at weight ``disagreement`` (0: plain rounds;
    an aimed image costs about 2.7x a plain one)."""

    invert_every: int = 0
    images_per_round: int = 0
    disagreement: float = ROUND_DISAGREEMENT

    def validate(self) -> "RoundsConfig":
        if self.invert_every < 0 or self.images_per_round < 0 or self.disagreement < 0:
            raise UsageError("--invert-every, --num-images-per-round and --round-disagreement cannot be negative.")
        if (self.invert_every > 0) != (self.images_per_round > 0):
            raise UsageError("--invert-every and --num-images-per-round go together: give both or neither.")
        return self


def frozen_student(student: nn.Module) -> nn.Module:
    """A copy of ``student`` as it predicts now, for a round's inversion loss: eval mode, no gradients;
    a quantized student mid-training is its plain quantized model (as its saved file holds it)."""
    return end_qat(copy.deepcopy(student)).eval().requires_grad_(False)


def round_folder(out: str | os.PathLike, r: int) -> Path:
    return sibling(out, ".rounds") / f"round_{r:03d}"


def _epochs_done(out: str | os.PathLike) -> int:
    path = sibling(out, ".last.pt")
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except Exception:  # distill() itself reports a damaged resume file
        return 0


def distill_with_rounds(
    teacher: nn.Module,
    student: nn.Module,
    pool: str | os.PathLike,
    config: DistillConfig,
    rounds: RoundsConfig,
    out: str | os.PathLike,
    val=None,
    *,
    teacher_name: str | None = None,
    student_name: str | None = None,
    teacher_checkpoint: str | None = None,
    allow_other_weights: bool = False,
    progress: bool = True,
) -> dict:
    """:func:`distill` on ``pool``, inverting a new round before every ``invert_every``-th epoch.

    Interrupted, the same call continues: finished rounds are re-read (an unfinished one
    is continued by the inverter) and training resumes from its last epoch.

    Returns:
        :func:`distill`'s summary, plus ``inversion_seconds`` (the rounds' inversion time) and
        ``rounds`` (``rounds`` as a dict).
    """
    rounds.validate()
    config.validate()
    first = open_pool(pool)
    record, recorded = first.record, pool_settings(first)  # a record that cannot be rebuilt is refused before training
    pools = [first]
    done = _epochs_done(out)
    inversion_seconds = 0.0
    r = 0
    while True:
        until = min(config.epochs, (r + 1) * rounds.invert_every) if rounds.invert_every else config.epochs
        # Called at the epoch it resumes from too: a round being continued needs the student as it was.
        if until >= done or until == config.epochs:
            summary = distill(teacher, student, pools, config, out, val, teacher_name=teacher_name,
                              student_name=student_name, until_epoch=until, allow_other_weights=allow_other_weights, progress=progress)
        if until >= config.epochs:
            break
        r += 1
        loss = recorded.loss
        if rounds.disagreement:
            loss = replace(loss, extra=[*loss.extra, (rounds.disagreement, StudentDisagreement(frozen_student(student)))])
        settings = replace(recorded, num_images=rounds.images_per_round, batch_size=min(recorded.batch_size, rounds.images_per_round),
                           seed=recorded.seed + ROUND_SEED_OFFSET + r, loss=loss)
        result = invert(teacher, settings, str(round_folder(out, r)), model_name=record.model,
                        checkpoint=teacher_checkpoint or record.checkpoint, progress=progress)
        inversion_seconds += float(result.run["wall_seconds"])
        pools.append(open_pool(round_folder(out, r)))
    summary["inversion_seconds"] = inversion_seconds
    summary["rounds"] = asdict(rounds)
    return summary
