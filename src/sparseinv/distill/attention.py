"""Attention distillation: the student's attention maps pulled toward the teacher's, head by head.

Logits and tokens say what the teacher concludes; its attention maps say where each
head looked to get there. A quantized ViT's low-bit q, k and softmax bend exactly
those maps, and a few hundred synthetic images teach the logits long before they
teach the structure behind them (held-out agreement rises while real-image top-1
falls). The term here is MiniLM's and MimiQ's head-wise structural distillation: for
every matched block, head and query token, ``KL(teacher row || student row)`` over the
keys, averaged.

Two forms:

* ``heads``: every query row of every head.
* ``foreground``: only the rows of the class token and of the patches the teacher's
  class token attends to most (MaskAQ's foreground alignment): the background rows of
  an inverted image are the part the teacher never relied on.
"""

from __future__ import annotations

import torch

from sparseinv.distill.config import ATTENTION_FORMS
# Share of the fed patches whose rows the foreground form keeps (the most attended by the
# teacher's last-block class token, averaged over heads).
FOREGROUND_SHARE = 0.5


def row_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of each attention row: (B, H, N, N) -> (B, H, N)."""
    t = teacher.detach().float()
    s = student.float()
    # Softmax weights can underflow to 0; clamp before the log (0 * log 0 counts as 0).
    return (t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1)


def foreground_rows(teacher_last: torch.Tensor, num_prefix: int, share: float = FOREGROUND_SHARE) -> torch.Tensor:
    """(B, N) bool: the prefix rows and the ``share`` of patch rows most attended by the class token.

    Args:
        teacher_last: The teacher's last attention map, (B, H, N, N).
        num_prefix: Class and register tokens at the front of the sequence.
    """
    cls = teacher_last.detach()[:, :, 0, num_prefix:].float().mean(1)  # (B, patches)
    count = max(1, round(share * cls.shape[1]))
    rows = torch.zeros(teacher_last.shape[0], teacher_last.shape[-1], dtype=torch.bool, device=teacher_last.device)
    rows[:, :num_prefix] = True
    rows[:, num_prefix:].scatter_(1, cls.topk(count, dim=1).indices, True)
    return rows


def attention_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], form: str = "heads",
                   num_prefix: int = 1) -> torch.Tensor:
    """Mean row KL between matched maps (pairs in order), over blocks, heads and the rows ``form`` keeps.

    Args:
        student_maps: The student's maps, (B, H, N, N) each, with their graph.
        teacher_maps: The teacher's at the matched blocks, same shapes.
        form: ``heads`` (every row) or ``foreground`` (see :func:`foreground_rows`).
        num_prefix: Class and register tokens at the front.
    """
    if form not in ATTENTION_FORMS:
        raise ValueError(f"unknown attention form {form!r}")
    rows = foreground_rows(teacher_maps[-1], num_prefix) if form == "foreground" else None
    terms = []
    for s, t in zip(student_maps, teacher_maps):
        kl = row_kl(t.to(s.device), s)  # (B, H, N)
        if rows is None:
            terms.append(kl.mean())
        else:
            weight = rows.to(kl.device).unsqueeze(1).float()  # the same rows in every head
            terms.append((kl * weight).sum() / (weight.sum() * kl.shape[1]))
    return torch.stack(terms).mean()
