"""The inversion loop: one batch of labels in, its images and kept patches out.

:func:`invert_batch` is the loop for one batch: Adam over pixels, roll/flip
augmentation, a pluggable loss, best-so-far pixels per image, and, when the schedule
says so, scoring patches by last-block CLS attention and dropping the rest from the
token sequence for good. Many batches, pools, ranks and the picture of a run are the
runs layer's (:func:`sparseinv.runs.inversion.invert`).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparseinv.inversion.augment import ColorShift
from sparseinv.vit.views import RollFlip, ViewIndex
from sparseinv.inversion.config import InversionConfig
from sparseinv.inversion.precision import Precision, resolve_precision
from sparseinv.inversion.losses import LossInputs, gaussian_attention_priors
from sparseinv.errors import UsageError
from sparseinv.inversion.monitor import StepMonitor
from sparseinv.models import ViTInfo, is_vit, vit_info
from sparseinv.inversion.kept_pixels import KeptImages, KeptPixels
from sparseinv.vit.forward import AttentionMaps, OutputRecorder, _patch_projection, sparse_forward


@dataclass
class BatchResult:
    """One inverted batch.

    Attributes:
        images: (B, 3, H, W) pixels in [0, 1], 8-bit exact, stopped patches zero.
        labels: (B,) target classes.
        kept_patches: (B, K) sorted 0-based row-major indices of the kept patches.
        target_prob: (B,) the model's probability of the label, fed the kept patches.
        seconds_per_phase: wall time of each stretch between stop steps.
        tokens_per_phase: patch tokens fed in each stretch.
        correct: (B,) whether the model's top class, fed the kept patches, is the label.
        final_seconds: the closing dense scoring pass and the check of the outputs.
        detached_at: rebirth only, (B, N) the step each patch was detached at (the
            iterations for those still optimised when the run ended); ``None`` otherwise.
    """

    images: torch.Tensor
    labels: torch.Tensor
    kept_patches: torch.Tensor
    target_prob: torch.Tensor
    correct: torch.Tensor
    seconds_per_phase: list[float]
    tokens_per_phase: list[int]
    final_seconds: float
    detached_at: torch.Tensor | None = None

    @property
    def wall_seconds(self) -> float:
        return sum(self.seconds_per_phase) + self.final_seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _patch_mask(keep: torch.Tensor, info: ViTInfo) -> torch.Tensor:
    """(B, 1, H, W) boolean pixel mask of the patches in ``keep``."""
    rows, cols = info.grid_size
    cells = torch.zeros(keep.shape[0], rows * cols, dtype=torch.bool, device=keep.device)
    cells.scatter_(1, keep, True)
    cells = cells.view(-1, 1, rows, cols)
    return cells.repeat_interleave(info.patch_size[0], 2).repeat_interleave(info.patch_size[1], 3)


def _top_patches(cls_attn: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` kept patches with the highest CLS attention, as sorted indices."""
    top = cls_attn.topk(count, dim=1).indices
    return keep.gather(1, top).sort(dim=1).values


def _split_patches(cls_attn: torch.Tensor, keep: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebirth's split of the optimised patches ``keep``: the ``count`` with the highest CLS
    attention (detached) and the rest (still optimised), each as sorted indices. One ordering
    makes both, so a tie can never put a patch in both or neither."""
    order = cls_attn.argsort(dim=1, descending=True)
    return keep.gather(1, order[:, :count]).sort(dim=1).values, keep.gather(1, order[:, count:]).sort(dim=1).values


def invert_batch(
    model: nn.Module,
    labels: torch.Tensor,
    config: InversionConfig,
    *,
    seed: int,
    progress: bool = True,
    desc: str = "invert",
    cuda_graphs: bool = False,
) -> BatchResult:
    """Invert one batch of images towards ``labels``.

    Args:
        model: A timm ViT in eval mode; its weights are not changed.
        labels: (B,) target classes, on the model's device.
        config: Learning rate, iterations, schedule and loss.
        seed: Seeds the initial pixels and every augmentation draw; the same seed,
            settings and device give the same images.
        progress: Show a tqdm bar with step, loss and tokens kept.
        desc: The bar's label.
        cuda_graphs: On CUDA, capture each phase's step (forward, loss, backward, Adam,
            clamp) as a CUDA graph after a few eager steps and replay it: one launch per
            step instead of hundreds. The same images up to float rounding.
    """
    info = vit_info(model)
    precision = resolve_precision(config.precision, labels.device)
    generator = torch.Generator().manual_seed(seed)
    # Drawn on the CPU so CPU and CUDA runs start from the same pixels.
    x = torch.randn(labels.shape[0], *info.input_size, generator=generator).to(labels.device)
    # Gradients flow to the pixels only; the caller's flags are restored afterwards.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        with precision.attention(model):
            return _run_phases(model, labels, config, info, x, generator, progress, desc, precision, cuda_graphs)
    finally:
        for param in trainable:
            param.requires_grad_(True)


def pixel_adam(param: torch.Tensor, lr: float, betas: tuple[float, float], capturable: bool = False) -> torch.optim.Adam:
    """Adam over the pixels, fused where the device has the kernel.

    The fused step is one kernel with its step count kept on the device; the plain one
    reads the count back to the host every step (a stall on a GPU), and on a CPU it is
    about 3x slower for the same arithmetic. ``capturable``: safe to capture in a CUDA graph.
    """
    try:
        return torch.optim.Adam([param], lr=lr, betas=betas, fused=True, capturable=capturable)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam([param], lr=lr, betas=betas, capturable=capturable)


def _carry_adam(old: torch.optim.Adam, old_param: torch.Tensor, new_param: torch.Tensor, pick) -> torch.optim.Adam:
    """A fresh Adam over ``new_param`` whose state is ``pick`` of the old one's: the kept
    pixels go on with their own moments, exactly as if the optimiser had never changed."""
    group = old.param_groups[0]
    new = pixel_adam(new_param, group["lr"], group["betas"], group["capturable"])
    state = old.state.get(old_param)
    if state:
        new.state[new_param] = {"step": state["step"].clone(), "exp_avg": pick(state["exp_avg"]), "exp_avg_sq": pick(state["exp_avg_sq"])}
    return new


def prior_pairs(cls_attn: torch.Tensor, priors: torch.Tensor, keep: torch.Tensor, view: ViewIndex,
                dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The class-token attention of one step and the attention prior, at the same original patches.

    Args:
        cls_attn: (B, K) attention to the fed tokens, in feed order.
        priors: (B, N) each image's prior over its original patch grid.
        keep: (B, K) the original patches the step optimised (every patch in the dense phase).
        view: The step's roll and flip.
        dense: Whether the whole augmented grid was fed (its cell ``remap(p)`` shows patch
            ``p``); otherwise fed token ``k`` shows original patch ``keep[:, k]``.
    """
    if dense:
        cls_attn = cls_attn.gather(1, view.remap(keep))
    return cls_attn, priors.gather(1, keep)


@dataclass(frozen=True)
class _Feed:
    """What every step of one batch feeds the model and scores it by; fixed for the batch.

    Attributes:
        every: (B, N) every patch index: the dense phase's fed cells, and the final mask of a dense image.
        per_patch: With a per-patch projection the gradient enters through the fed patches
            alone; otherwise (other patch embeddings) through the whole augmented image.
        recorder: Records every block's attention for the losses that read it (else a null context).
        maps: Records every block's softmax attention for the losses that read it (else a null context).
        priors: (B, N) each image's attention prior, when the loss has one.
        max_shift: The largest roll, (rows, columns) of pixels.
        graphs: Capture each phase's step as a CUDA graph (see :func:`_run_steps`).
    """

    model: nn.Module
    labels: torch.Tensor
    config: InversionConfig
    info: ViTInfo
    precision: Precision
    generator: torch.Generator
    every: torch.Tensor
    per_patch: bool
    recorder: contextlib.AbstractContextManager
    maps: contextlib.AbstractContextManager
    priors: torch.Tensor | None
    max_shift: tuple[int, int]
    graphs: bool = False


class _Optimised:
    """The pixels one batch optimises (the kept patches, :class:`KeptPixels`), their Adam,
    and the best of them in the current phase."""

    def __init__(self, x: torch.Tensor, every: torch.Tensor, info: ViTInfo, config: InversionConfig, capturable: bool = False) -> None:
        self.best_loss = torch.full((x.shape[0],), float("inf"), device=x.device)
        self.pixels = KeptPixels(x, every, info)
        self.kept = self.pixels.gather(x).requires_grad_(True)
        self.optimizer = pixel_adam(self.kept, config.lr, config.betas, capturable)
        self.best = self.kept.detach().clone()

    def keep_only(self, keep: torch.Tensor, info: ViTInfo) -> None:
        """Go on with the patches ``keep`` of the current image (a stop)."""
        old, old_kept = self.pixels, self.kept
        self.pixels = KeptPixels(old.canvas, keep, info)
        self.kept = old.select(old_kept.detach(), keep).requires_grad_(True)
        self.optimizer = _carry_adam(self.optimizer, old_kept, self.kept, lambda t: old.select(t, keep))
        # Losses over different token sets are not comparable: fewer tokens give a
        # higher loss, so a "best" from an earlier phase would win for good and the
        # output would be an image optimised for patches it no longer has. The best
        # pixels are therefore the best of the current phase.
        self.best_loss.fill_(float("inf"))
        self.best = self.kept.detach().clone()

    def step(self, per_image: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
        """Keep the pixels that gave ``per_image`` where they beat the best, then one Adam step, clamped to [low, high].

        Every tensor it changes is changed in place, so a captured CUDA graph of it replays
        onto the same tensors.
        """
        self.optimizer.zero_grad(set_to_none=True)
        per_image.mean().backward()
        with torch.no_grad():
            improved = per_image.detach() < self.best_loss
            torch.where(improved, per_image.detach(), self.best_loss, out=self.best_loss)
            torch.where(improved.view(-1, *[1] * (self.kept.dim() - 1)), self.kept, self.best, out=self.best)
            self.optimizer.step()
            torch.maximum(torch.minimum(self.kept, high, out=self.kept.data), low, out=self.kept.data)
            self.pixels.write(self.kept)


def _run_phases(
    model: nn.Module,
    labels: torch.Tensor,
    config: InversionConfig,
    info: ViTInfo,
    x: torch.Tensor,
    generator: torch.Generator,
    progress: bool,
    desc: str,
    precision: Precision,
    cuda_graphs: bool = False,
) -> BatchResult:
    """The body of :func:`invert_batch`, run with the model's weights frozen.

    The optimised pixels are the kept patches only (:class:`KeptPixels`): all of them
    in the dense phase, fewer after each stop, the stopped ones frozen in the canvas.
    With ``config.strategy == "rebirth"`` a stop detaches the most-attended optimised
    patches instead (frozen in the canvas, part of the output, no longer fed) and the
    least-attended keep inverting; the output is the whole canvas.
    """
    device, batch = labels.device, labels.shape[0]
    _, height, width = info.input_size
    mean, std = info.norm_tensors(device)
    low, high = ((v - mean) / std for v in (0, 1))
    low, high = low.view(1, 3, 1, 1, 1), high.view(1, 3, 1, 1, 1)  # for (B, 3, K, ph, pw)
    counts = config.schedule.keep_counts(info.num_patches, config.strategy)
    every = torch.arange(info.num_patches, device=device).expand(batch, -1)
    # Rebirth: the step each patch is detached at; those never detached at a stop are at the end.
    detached_at = (torch.full((batch, info.num_patches), config.iterations, dtype=torch.long, device=device)
                   if config.strategy == "rebirth" else None)
    state = _Optimised(x, every, info, config, capturable=cuda_graphs)
    recorder = OutputRecorder.attention(model) if config.loss.needs_attention else contextlib.nullcontext()
    maps = AttentionMaps(model) if config.loss.needs_attention_maps else contextlib.nullcontext()
    # Drawn only when on, so runs without it keep their random stream (and their images).
    priors = gaussian_attention_priors(generator, batch, info.grid_size).to(device) if config.loss.needs_cls_attention else None
    feed = _Feed(model, labels, config, info, precision, generator, every, _patch_projection(model) is not None, recorder, maps, priors,
                 (int(height * config.jitter), int(width * config.jitter)), cuda_graphs)
    seconds_per_phase: list[float] = []
    # Nothing in a step reads a value back to the host (see StepMonitor): the GPU runs ahead.
    monitor = StepMonitor(device, config.lr)
    bar = tqdm(total=config.iterations, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for phase, (start, end) in enumerate(config.schedule.phase_bounds(config.iterations)):
        _sync(device)
        phase_start = time.perf_counter()
        if phase > 0:
            state.keep_only(_next_keep(feed, state.pixels, phase, start, counts, detached_at), info)

        def after(step: int, per_image: torch.Tensor, end: int = end, tokens: int = counts[phase]) -> None:
            if monitor.due(step + 1, step + 1 == end):
                monitor.snapshot(per_image, step + 1)
            bar.update(1)
            if monitor.loss is not None and (bar.n % monitor.every == 0 or bar.n == config.iterations):
                bar.set_postfix(loss=f"{monitor.loss:.3f}", tokens=tokens)

        _run_steps(feed, state, phase == 0, range(start, end), low, high, after)
        _sync(device)
        monitor.flush()
        seconds_per_phase.append(time.perf_counter() - phase_start)
    bar.close()

    final_start = time.perf_counter()
    images, kept_patches, target_prob, correct = _final_images(feed, state)
    _sync(device)
    return BatchResult(
        images=images.cpu(),
        labels=labels.cpu(),
        kept_patches=kept_patches.cpu(),
        target_prob=target_prob.cpu(),
        correct=correct.cpu(),
        seconds_per_phase=seconds_per_phase,
        tokens_per_phase=counts,
        final_seconds=time.perf_counter() - final_start,
        detached_at=None if detached_at is None else detached_at.cpu(),
    )


@torch.no_grad()
def _next_keep(feed: _Feed, pixels: KeptPixels, phase: int, start: int, counts: list[int],
               detached_at: torch.Tensor | None) -> torch.Tensor:
    """The patches phase ``phase`` (from step ``start``) optimises, scored on the un-augmented
    current image; rebirth (``detached_at`` given) records the step of the patches it detaches."""
    with feed.precision.autocast(feed.labels.device):
        scored = sparse_forward(feed.model, pixels.canvas, None if phase == 1 else pixels.keep, return_cls_attn=True)
    if detached_at is None:
        return _top_patches(scored.cls_attn, pixels.keep, counts[phase])
    gone, keep = _split_patches(scored.cls_attn, pixels.keep, counts[phase - 1] - counts[phase])
    detached_at.scatter_(1, gone, start)
    return keep


def _draw(feed: _Feed, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step's random draws, on the CPU: the roll and flip (:meth:`ViewIndex.pack`) and the colour shift's values."""
    config, info = feed.config, feed.info
    aug = RollFlip.sample(feed.generator, *feed.max_shift, config.flip)
    # Drawn only when on, so runs without it keep their random stream (and their images).
    colour = ColorShift.draw(feed.generator, batch, info.input_size[0], config.color_shift) if config.color_shift else None
    return ViewIndex.pack(aug, info.grid_size, info.patch_size), colour


def _to_device(values: torch.Tensor, device: torch.device, into: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` on ``device`` (copied into ``into`` if given) without making the host wait: from pinned memory on CUDA."""
    if device.type == "cuda":
        values = values.pin_memory()
    if into is not None:
        return into.copy_(values, non_blocking=True)
    return values.to(device, non_blocking=True)


# Eager steps on a side stream before a phase's step is captured (autograd and the fused
# Adam set themselves up on first use, which a capture must not record), and the shortest
# phase worth a capture.
GRAPH_WARMUP = 3
GRAPH_MIN_STEPS = GRAPH_WARMUP + 2


class CudaGraphStep:
    """One phase's step as a CUDA graph: warmed up on a side stream, captured once, replayed per step."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise UsageError(f"CUDA graphs need a CUDA device; this run is on {device}.")
        self.device = device
        self.graph = torch.cuda.CUDAGraph()

    def warm_up(self, steps: Callable[[], None]) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            steps()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record ``step`` (nothing runs); returns the tensor each replay writes its result to."""
        with torch.cuda.graph(self.graph):
            return step()

    def replay(self) -> None:
        self.graph.replay()


# What runs a captured step; tests on machines without CUDA put an eager stand-in here.
graph_step_factory: Callable[[torch.device], CudaGraphStep] = CudaGraphStep


def _run_steps(feed: _Feed, state: _Optimised, dense: bool, steps: range, low: torch.Tensor, high: torch.Tensor,
               after: Callable[[int, torch.Tensor], None]) -> None:
    """Run the steps ``steps`` of one phase, calling ``after(step, per_image loss)`` after each.

    Eager, each step is some hundreds of kernel launches, and at 46 tokens a GPU finishes
    them faster than Python issues them. With ``feed.graphs`` the step is captured as a
    CUDA graph after :data:`GRAPH_WARMUP` eager steps and replayed: one launch per step.
    The graph reads its random draws from fixed device tensors that are refilled before
    each replay, so the draws, and the images, are the eager loop's.
    """
    device, batch = feed.labels.device, state.kept.shape[0]
    grid, patch = feed.info.grid_size, feed.info.patch_size

    def step(packed: torch.Tensor, colour: torch.Tensor | None) -> torch.Tensor:
        per_image = _step_loss(feed, state.pixels, state.kept, dense, ViewIndex.unpack(packed, grid, patch),
                               None if colour is None else ColorShift.of(colour))
        state.step(per_image, low, high)
        return per_image.detach()

    if not feed.graphs or len(steps) < GRAPH_MIN_STEPS:
        for index in steps:
            packed, colour = _draw(feed, batch)
            after(index, step(_to_device(packed, device), None if colour is None else _to_device(colour, device)))
        return

    packed, colour = _draw(feed, batch)
    static = (torch.empty(packed.shape, dtype=packed.dtype, device=device),
              None if colour is None else torch.empty(colour.shape, dtype=colour.dtype, device=device))

    def refill(draws: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        for values, into in zip(draws, static):
            if values is not None:
                _to_device(values, device, into=into)

    pending = iter(steps)
    graph = graph_step_factory(device)

    def warm_steps() -> None:
        for n, index in enumerate(itertools.islice(pending, GRAPH_WARMUP)):
            refill((packed, colour) if n == 0 else _draw(feed, batch))
            after(index, step(*static))

    graph.warm_up(warm_steps)
    out = graph.capture(lambda: step(*static))
    for index in pending:
        refill(_draw(feed, batch))
        graph.replay()
        after(index, out)


def _step_loss(feed: _Feed, pixels: KeptPixels, kept: torch.Tensor, dense: bool, view: ViewIndex,
               shift: ColorShift | None) -> torch.Tensor:
    """One step's per-image loss, on the step's roll and flip (and colour shift) of the current image.

    Device work only: the draws come in as device tensors, so the step can be captured."""
    config, info, model, device = feed.config, feed.info, feed.model, feed.labels.device
    colour = (lambda t: t) if shift is None else shift.apply
    cells = feed.every if dense else view.remap(pixels.keep)
    with feed.precision.autocast(device), feed.recorder as recorded, feed.maps as maps:
        if feed.per_patch:
            fed = colour(pixels.fed_pixels(kept, cells, view))
            out = sparse_forward(model, colour(view.apply(pixels.canvas)), None if dense else cells, pixel_grad=fed,
                                 return_cls_attn=feed.priors is not None)
        else:
            out = sparse_forward(model, colour(view.apply(pixels.compose(kept))), None if dense else cells,
                                 return_cls_attn=feed.priors is not None)
    cls_attn, target = (None, None) if feed.priors is None else prior_pairs(out.cls_attn, feed.priors, pixels.keep, view, dense)

    def fed(other: nn.Module) -> torch.Tensor:
        # The same pixels, roll, flip and colour (in this model's normalisation); a ViT of this input
        # size and patch grid gets the same tokens, one of another size the whole image resized to its own.
        x = colour(view.apply(pixels.compose(kept)))
        with feed.precision.autocast(device):
            if not is_vit(other):
                return other(x).float()
            theirs = vit_info(other)
            if theirs.input_size != info.input_size:
                x = F.interpolate(x, size=theirs.input_size[1:], mode="bilinear", align_corners=False)
            same_tokens = theirs.input_size == info.input_size and theirs.grid_size == info.grid_size
            return sparse_forward(other, x, None if dense or not same_tokens else cells).logits.float()

    return config.loss(LossInputs(logits=out.logits.float(), targets=feed.labels, pixels=KeptImages(pixels, kept),
                                  attention=None if recorded is None else recorded.values,
                                  num_prefix=model.num_prefix_tokens, cls_attn=cls_attn, attention_target=target,
                                  attention_maps=None if maps is None else maps.maps, fed=fed))


@torch.no_grad()
def _final_images(feed: _Feed, state: _Optimised) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best pixels of the last phase as 8-bit-exact images with their mask, and the model's
    verdict on them: (images, kept patches, probability of the label, top class is the label)."""
    model, config, info, labels = feed.model, feed.config, feed.info, feed.labels
    mean, std = info.norm_tensors(labels.device)
    best_x = state.pixels.compose(state.best)
    final_count = info.num_patches if config.strategy == "rebirth" else config.schedule.final_keep(info.num_patches)
    if final_count == info.num_patches:
        kept_patches = feed.every.clone()
    elif config.final_mask == "last-phase":
        kept_patches = state.pixels.keep.clone()
    else:
        scored = sparse_forward(model, best_x, None, return_cls_attn=True)
        kept_patches = _top_patches(scored.cls_attn, feed.every, final_count)
    images = (best_x * std + mean).clamp_(0, 1)
    images = torch.round(images * 255) / 255  # exactly what the PNGs will hold
    images = images * _patch_mask(kept_patches, info)
    probs = sparse_forward(model, (images - mean) / std, kept_patches).logits.softmax(dim=1)
    return images, kept_patches, probs.gather(1, labels[:, None]).squeeze(1), probs.argmax(dim=1) == labels
