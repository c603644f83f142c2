"""Running as one of several processes started by ``torchrun``.

``torchrun`` starts one process per device and tells each its place in environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...). The
``sparseinv`` command joins the process group from them (:func:`init_from_env`);
the library asks :func:`current` where it stands and otherwise behaves as one
process: rank 0 of 1, every collective a no-op. Only PyTorch's own
``torch.distributed`` is used: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from sparseinv.errors import UsageError

T = TypeVar("T")

# A rank that finished its share waits for the others at a barrier. On a CPU one
# reference-schedule batch can take hours, longer than torch's 30-minute default, so
# the wait is long; a rank that dies is noticed by torchrun, which stops the others.
TIMEOUT = datetime.timedelta(hours=int(os.environ.get("SPARSEINV_DIST_TIMEOUT_HOURS", "24")))


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world_size``-th, starting at ``rank`` (round robin)."""
        return list(items[self.rank :: self.world_size])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, value: float) -> float:
        """The sum of ``value`` over the ranks."""
        return float(sum(self.all_gather(float(value))))

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over every rank's elements together (detached; this rank's alone when alone)."""
        values = values.detach()
        if not self.active:
            return values.mean()
        stats = torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device)])
        dist.all_reduce(stats)
        return stats[0] / stats[1]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give its result to every rank.

        A :class:`UsageError` on rank 0 is raised on every rank, so a refused input
        stops the whole job at once instead of leaving the others at a barrier.
        """
        if not self.active:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UsageError as err:
                error = str(err)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise UsageError(error)
        return result


def current() -> Dist:
    """This process's place: from the process group if one is up, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Dist()


def init_from_env(device_type: str) -> Dist:
    """Join the process group torchrun set up (gloo for CPU, nccl for CUDA).

    On CUDA each process takes the GPU of its local rank.

    Raises:
        UsageError: CUDA was asked for but this machine has fewer GPUs than processes.
    """
    if dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"process {local_rank} on this machine has no GPU of its own ({torch.cuda.device_count()} found): "
                "start at most one process per GPU (--nproc-per-node)."
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return current()


def shutdown() -> None:
    """Leave the process group (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
