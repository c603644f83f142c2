"""The inversion step never makes the host wait for the device.

On a GPU every value read back (``.item()``, ``bool(t)``, a boolean-mask index, which
needs the count of its true elements) stalls the host until the queue drains. Counted on
the CPU at the dispatcher, where the same calls show up whatever the device.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparseinv.inversion.config import InversionConfig
from sparseinv.inversion.loop import invert_batch
from sparseinv.inversion.schedule import PruneSchedule

# Ops that read a device value to the host, or whose output shape depends on values.
READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal", "masked_select", "unique", "_unique2"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostReads(TorchDispatchMode):
    """Counts the ops that would synchronise a GPU with its host."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READS:
            self.counts[name] += 1
        elif name in INDEXING:
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.counts[f"{name}(mask)"] += 1
        return func(*args, **(kwargs or {}))


def _reads(model, iterations: int, sparse: bool) -> collections.Counter:
    # Stops at the same fraction of the run, so both lengths have the same phase changes.
    schedule = PruneSchedule(tuple(iterations * k // 8 for k in (1, 2, 3, 4)), (0.3,) * 4) if sparse else PruneSchedule()
    config = InversionConfig(num_images=2, batch_size=2, iterations=iterations, schedule=schedule)
    with HostReads() as mode:
        invert_batch(model, torch.tensor([1, 2]), config, seed=0, progress=True)
    return mode.counts


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_step_reads_nothing_back_to_the_host(tiny_vit, sparse):
    # The difference between two run lengths is what the extra steps cost, without the
    # fixed reads of a batch (phase changes, the final scoring, the outputs).
    short, long = _reads(tiny_vit, 16, sparse), _reads(tiny_vit, 48, sparse)
    per_step = {op: (long[op] - short[op]) / 32 for op in long | short}
    assert sum(per_step.values()) <= 0.1, per_step
