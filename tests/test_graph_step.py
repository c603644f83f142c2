"""The inversion step replayed as a captured CUDA graph, checked where there is no GPU.

A captured graph replays the kernels of one step on the same tensors: it sees new
random draws only through tensors refilled before each replay, and state only through
tensors the step changes in place. Both are checked here on the CPU: an eager stand-in
for the graph runs the loop's capture path (warm-up, capture, refill, replay), and the
step's state is watched for tensors replaced instead of written. ``tests/test_cuda.py``
runs the real graphs on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from sparseinv import UsageError, invert
from sparseinv.inversion import loop
from sparseinv.inversion.config import InversionConfig
from sparseinv.inversion.losses import InversionLoss
from sparseinv.inversion.schedule import PruneSchedule
from sparseinv.vit.views import RollFlip, ViewIndex


class EagerGraph:
    """A stand-in for :class:`loop.CudaGraphStep`: ``capture`` records the step, each ``replay`` runs it."""

    captures = replays = 0

    def __init__(self, device: torch.device) -> None:
        self.step, self.out = None, torch.empty(0)

    def warm_up(self, steps) -> None:
        steps()

    def capture(self, step):
        EagerGraph.captures += 1
        self.step = step  # a real capture runs nothing either
        return self.out

    def replay(self) -> None:
        EagerGraph.replays += 1
        result = self.step()
        self.out.resize_(result.shape).copy_(result)


@pytest.fixture
def eager_graph(monkeypatch):
    EagerGraph.captures = EagerGraph.replays = 0
    monkeypatch.setattr(loop, "graph_step_factory", EagerGraph)
    return EagerGraph


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_the_captured_path_makes_the_eager_loops_images(tiny_vit, eager_graph, kind):
    # Phases of 3, 5, 6, 6 and 10 steps: the first is too short to capture (eager), the rest
    # are warmed up for GRAPH_WARMUP steps, captured once and replayed. The colour shift and
    # the attention prior add draws and a remap that must follow each replay's draw.
    sparse = kind == "sparse"
    config = InversionConfig(num_images=3, batch_size=3, iterations=30, color_shift=0.5 if sparse else 0.0,
                             schedule=PruneSchedule((3, 8, 14, 20), (0.3,) * 4) if sparse else PruneSchedule(),
                             loss=InversionLoss(attention_prior=0.1) if sparse else InversionLoss())
    labels = torch.tensor([1, 2, 3])
    eager = loop.invert_batch(tiny_vit, labels, config, seed=5, progress=False)
    graphed = loop.invert_batch(tiny_vit, labels, config, seed=5, progress=False, cuda_graphs=True)
    assert torch.equal(graphed.images, eager.images)
    assert torch.equal(graphed.kept_patches, eager.kept_patches)
    phases = [end - start for start, end in config.schedule.phase_bounds(config.iterations)]
    captured = [n for n in phases if n >= loop.GRAPH_MIN_STEPS]
    assert eager_graph.captures == len(captured) and len(captured) == (4 if sparse else 1)
    assert eager_graph.replays == sum(n - loop.GRAPH_WARMUP for n in captured)


def test_the_step_changes_its_state_in_place(tiny_vit):
    # A graph replays onto the tensors it was captured with: state the step replaced with a
    # new tensor would be left behind by every replay.
    config = InversionConfig(batch_size=2)
    info = loop.vit_info(tiny_vit)
    x = torch.randn(2, *info.input_size)
    every = torch.arange(info.num_patches).expand(2, -1)
    state = loop._Optimised(x, every, info, config)
    keep = torch.tensor([[0, 5, 17, 60], [3, 4, 50, 99]])
    state.keep_only(keep, info)  # a sparse phase: the kept patches alone are optimised
    low, high = torch.full((1, 3, 1, 1, 1), -2.0), torch.full((1, 3, 1, 1, 1), 2.0)

    def tensors():
        adam = state.optimizer.state[state.kept]
        return [state.kept, state.best, state.best_loss, state.pixels.canvas, adam["exp_avg"], adam["exp_avg_sq"], adam["step"]]

    def loss():
        return (state.kept.square().flatten(1).mean(1) - torch.arange(2.0)) ** 2

    state.step(loss(), low, high)  # the first step creates Adam's state
    before = [t.data_ptr() for t in tensors()]
    values = [t.clone() for t in tensors()]
    state.step(loss(), low, high)
    assert [t.data_ptr() for t in tensors()] == before
    changed = [not torch.equal(a, b) for a, b in zip(values, tensors())]
    assert all(changed[:2]) and changed[3:] == [True] * 4  # kept, best, canvas, Adam moved (best_loss may tie)


def test_cuda_graphs_are_refused_off_cuda(tiny_vit):
    with pytest.raises(UsageError, match="needs a CUDA device"):
        invert(tiny_vit, InversionConfig(num_images=1, batch_size=1, iterations=2), cuda_graphs=True, progress=False)
