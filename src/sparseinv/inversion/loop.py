"""The inversion loop: one batch, and many batches into a pool.

:func:`invert_batch` is the loop for one batch: Adam over pixels, roll/flip
augmentation, a pluggable loss, best-so-far pixels per image, and, when the schedule
says so, scoring patches by last-block CLS attention and dropping the rest from the
token sequence for good. :func:`invert` runs many batches and, given a folder, writes
them as a pool that survives interruption.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseinv import distributed
from sparseinv.inversion.augment import ColorShift
from sparseinv.vit.views import RollFlip
from sparseinv.inversion.config import InversionConfig
from sparseinv.inversion.precision import Precision, resolve_precision
from sparseinv.inversion.losses import LossInputs, gaussian_attention_priors
from sparseinv.inversion.monitor import StepMonitor
from sparseinv.models import ViTInfo, vit_info, weights_fingerprint
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


def assign_labels(config: InversionConfig, num_classes: int) -> list[int]:
    """One target class per image, balanced over the chosen classes.

    Given classes are cycled in the order given; otherwise every class is drawn once
    (a seeded permutation) before any repeats.
    """
    if config.classes is not None:
        return [config.classes[i % len(config.classes)] for i in range(config.num_images)]
    generator = torch.Generator().manual_seed(config.seed)
    labels: list[int] = []
    while len(labels) < config.num_images:
        labels.extend(torch.randperm(num_classes, generator=generator).tolist())
    return labels[: config.num_images]


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
            return _run_phases(model, labels, config, info, x, generator, progress, desc, precision)
    finally:
        for param in trainable:
            param.requires_grad_(True)


def pixel_adam(param: torch.Tensor, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over the pixels, fused where the device has the kernel.

    The fused step is one kernel with its step count kept on the device; the plain one
    reads the count back to the host every step (a stall on a GPU), and on a CPU it is
    about 3x slower for the same arithmetic.
    """
    try:
        return torch.optim.Adam([param], lr=lr, betas=betas, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam([param], lr=lr, betas=betas)


def _carry_adam(old: torch.optim.Adam, old_param: torch.Tensor, new_param: torch.Tensor, pick) -> torch.optim.Adam:
    """A fresh Adam over ``new_param`` whose state is ``pick`` of the old one's: the kept
    pixels go on with their own moments, exactly as if the optimiser had never changed."""
    group = old.param_groups[0]
    new = pixel_adam(new_param, group["lr"], group["betas"])
    state = old.state.get(old_param)
    if state:
        new.state[new_param] = {"step": state["step"].clone(), "exp_avg": pick(state["exp_avg"]), "exp_avg_sq": pick(state["exp_avg_sq"])}
    return new


def prior_pairs(cls_attn: torch.Tensor, priors: torch.Tensor, keep: torch.Tensor, aug: RollFlip, dense: bool,
                info) -> tuple[torch.Tensor, torch.Tensor]:
    """The class-token attention of one step and the attention prior, at the same original patches.

    Args:
        cls_attn: (B, K) attention to the fed tokens, in feed order.
        priors: (B, N) each image's prior over its original patch grid.
        keep: (B, K) the original patches the step optimised (every patch in the dense phase).
        aug: The step's roll and flip.
        dense: Whether the whole augmented grid was fed (its cell ``remap(p)`` shows patch
            ``p``); otherwise fed token ``k`` shows original patch ``keep[:, k]``.
    """
    if dense:
        cls_attn = cls_attn.gather(1, aug.remap(keep, info.grid_size, info.patch_size))
    return cls_attn, priors.gather(1, keep)


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
) -> BatchResult:
    """The body of :func:`invert_batch`, run with the model's weights frozen.

    The optimised pixels are the kept patches only (:class:`KeptPixels`): all of them
    in the dense phase, fewer after each stop, the stopped ones frozen in the canvas.
    With ``config.strategy == "rebirth"`` a stop detaches the most-attended optimised
    patches instead (frozen in the canvas, part of the output, no longer fed) and the
    least-attended keep inverting; the output is the whole canvas.
    """
    device = labels.device
    schedule = config.schedule
    batch = labels.shape[0]
    _, height, width = info.input_size
    mean, std = info.norm_tensors(device)
    low, high = ((v - mean) / std for v in (0, 1))
    low, high = low.view(1, 3, 1, 1, 1), high.view(1, 3, 1, 1, 1)  # for (B, 3, K, ph, pw)
    # With a per-patch projection the gradient enters through the fed patches alone;
    # otherwise (other patch embeddings) through the whole augmented image.
    per_patch = _patch_projection(model) is not None
    best_loss = torch.full((batch,), float("inf"), device=device)

    rebirth = config.strategy == "rebirth"
    counts = schedule.keep_counts(info.num_patches, config.strategy)
    bounds = schedule.phase_bounds(config.iterations)
    every = torch.arange(info.num_patches, device=device).expand(batch, -1)
    # Rebirth: the step each patch is detached at; those never detached at a stop are at the end.
    detached_at = torch.full((batch, info.num_patches), config.iterations, dtype=torch.long, device=device) if rebirth else None
    pixels = KeptPixels(x, every, info)
    kept = pixels.gather(x).requires_grad_(True)
    optimizer = pixel_adam(kept, config.lr, config.betas)
    best = kept.detach().clone()
    max_dy, max_dx = int(height * config.jitter), int(width * config.jitter)
    seconds_per_phase: list[float] = []
    attention_recorder = OutputRecorder.attention(model) if config.loss.needs_attention else contextlib.nullcontext()
    maps_recorder = AttentionMaps(model) if config.loss.needs_attention_maps else contextlib.nullcontext()
    # Drawn only when on, so runs without it keep their random stream (and their images).
    priors = gaussian_attention_priors(generator, batch, info.grid_size).to(device) if config.loss.needs_cls_attention else None

    # Nothing in a step reads a value back to the host (see StepMonitor): the GPU runs ahead.
    monitor = StepMonitor(device, config.lr)
    bar = tqdm(total=config.iterations, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for phase, (start, end) in enumerate(bounds):
        _sync(device)
        phase_start = time.perf_counter()
        if phase > 0:
            # Score on the un-augmented current image, then stop the low-attention patches.
            with torch.no_grad():
                current = pixels.canvas
                with precision.autocast(device):
                    scored = sparse_forward(model, current, None if phase == 1 else pixels.keep, return_cls_attn=True)
                if rebirth:
                    gone, keep = _split_patches(scored.cls_attn, pixels.keep, counts[phase - 1] - counts[phase])
                    detached_at.scatter_(1, gone, start)
                else:
                    keep = _top_patches(scored.cls_attn, pixels.keep, counts[phase])
            old, old_kept = pixels, kept
            pixels = KeptPixels(current, keep, info)
            kept = old.select(old_kept.detach(), keep).requires_grad_(True)
            optimizer = _carry_adam(optimizer, old_kept, kept, lambda t, old=old, keep=keep: old.select(t, keep))
            # Losses over different token sets are not comparable: fewer tokens give a
            # higher loss, so a "best" from an earlier phase would win for good and the
            # output would be an image optimised for patches it no longer has. The best
            # pixels are therefore the best of the current phase.
            best_loss.fill_(float("inf"))
            best = kept.detach().clone()
        dense = phase == 0
        for step in range(start, end):
            aug = RollFlip.sample(generator, max_dy, max_dx, config.flip)
            # Drawn only when on, so runs without it keep their random stream (and their images).
            shift = ColorShift.sample(generator, batch, x.shape[1], config.color_shift, device) if config.color_shift else None
            colour = (lambda t: t) if shift is None else shift.apply
            cells = every if dense else aug.remap(pixels.keep, info.grid_size, info.patch_size)
            with precision.autocast(device), attention_recorder as recorded, maps_recorder as maps:
                if per_patch:
                    fed = colour(pixels.fed_pixels(kept, cells, aug))
                    out = sparse_forward(model, colour(aug.apply(pixels.canvas)), None if dense else cells, pixel_grad=fed,
                                         return_cls_attn=priors is not None)
                else:
                    out = sparse_forward(model, colour(aug.apply(pixels.compose(kept))), None if dense else cells,
                                         return_cls_attn=priors is not None)
            cls_attn, target = (None, None) if priors is None else prior_pairs(out.cls_attn, priors, pixels.keep, aug, dense, info)
            per_image = config.loss(LossInputs(logits=out.logits.float(), targets=labels, pixels=KeptImages(pixels, kept),
                                               attention=None if recorded is None else recorded.values,
                                               num_prefix=model.num_prefix_tokens, cls_attn=cls_attn, attention_target=target,
                                               attention_maps=None if maps is None else maps.maps))
            optimizer.zero_grad(set_to_none=True)
            per_image.mean().backward()
            with torch.no_grad():
                improved = per_image.detach() < best_loss
                best_loss = torch.where(improved, per_image.detach(), best_loss)
                torch.where(improved.view(-1, *[1] * (kept.dim() - 1)), kept, best, out=best)
                optimizer.step()
                torch.maximum(torch.minimum(kept, high, out=kept.data), low, out=kept.data)
                pixels.write(kept)
            if monitor.due(step + 1, step + 1 == end):
                monitor.snapshot(per_image, step + 1)
            bar.update(1)
            if monitor.loss is not None and (bar.n % monitor.every == 0 or bar.n == config.iterations):
                bar.set_postfix(loss=f"{monitor.loss:.3f}", tokens=counts[phase])
        _sync(device)
        monitor.flush()
        seconds_per_phase.append(time.perf_counter() - phase_start)
    bar.close()

    final_start = time.perf_counter()
    with torch.no_grad():
        best_x = pixels.compose(best)
        final_count = info.num_patches if rebirth else schedule.final_keep(info.num_patches)
        if final_count == info.num_patches:
            kept_patches = every.clone()
        elif config.final_mask == "last-phase":
            kept_patches = pixels.keep.clone()
        else:
            scored = sparse_forward(model, best_x, None, return_cls_attn=True)
            kept_patches = _top_patches(scored.cls_attn, every, final_count)
        images = (best_x * std + mean).clamp_(0, 1)
        images = torch.round(images * 255) / 255  # exactly what the PNGs will hold
        images = images * _patch_mask(kept_patches, info)
        probs = sparse_forward(model, (images - mean) / std, kept_patches).logits.softmax(dim=1)
        target_prob = probs.gather(1, labels[:, None]).squeeze(1)
        correct = probs.argmax(dim=1) == labels
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


@dataclass
class InversionResult:
    """All images of a run, in memory, plus its run record.

    Attributes:
        images: (N, 3, H, W) pixels in [0, 1], stopped patches zero.
        labels: (N,) target classes.
        kept_patches: (N, K) sorted kept patch indices.
        target_prob: (N,) the model's probability of each label, fed sparse.
        run: The run record (as in the pool's ``run.json``).
        detached_at: rebirth only, (N, num_patches) the step each patch was detached at.
    """

    images: torch.Tensor
    labels: torch.Tensor
    kept_patches: torch.Tensor
    target_prob: torch.Tensor
    run: dict
    detached_at: torch.Tensor | None = None


def run_record(model: nn.Module, config: InversionConfig, model_name: str | None, checkpoint: str | None) -> dict:
    """The parts of ``run.json`` known before the first step."""
    info = vit_info(model)
    return {
        "model": model_name or getattr(model, "default_cfg", {}).get("architecture", type(model).__name__),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "weights": weights_fingerprint(model),
        "settings": config.record(),
        "input_size": list(info.input_size),
        "patch_size": list(info.patch_size),
        "num_patches": info.num_patches,
        "num_classes": info.num_classes,
        "mean": list(info.mean),
        "std": list(info.std),
        "torch": torch.__version__,
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "precision": resolve_precision(config.precision, next(model.parameters()).device).record(),
    }


def invert(
    model: nn.Module,
    config: InversionConfig,
    out: str | None = None,
    *,
    model_name: str | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
) -> InversionResult:
    """Invert ``config.num_images`` images in batches; optionally write them as a pool.

    With ``out``, each batch is committed to the pool folder as soon as it is done,
    and a folder already holding part of the same run is continued, not restarted.
    Image ``i`` is made in batch ``i // batch_size``, seeded by ``config.seed`` and the
    batch index alone, so a continued run gives the images an uninterrupted one would.

    Run by several processes (``torchrun``, see :mod:`sparseinv.distributed`), the
    batches still to do are dealt round robin to the ranks (batch ``b`` to rank
    ``b mod P`` in a fresh run), each rank commits its own, and rank 0 merges; every
    rank returns the whole result. The images do not depend on the number of processes.

    Raises:
        UsageError: bad settings, or ``out`` holding a pool made with other settings.
    """
    from sparseinv.pool import PoolWriter, read_pool, summarise_batches
    from sparseinv.viz import class_namer, image_grid_png

    run_start = time.perf_counter()
    info = vit_info(model)
    config.validate(info.num_classes)
    device = next(model.parameters()).device
    labels = assign_labels(config, info.num_classes)
    rank = distributed.current()
    num_batches = -(-config.num_images // config.batch_size)
    writer = None
    done: list[int] = []
    if out is not None:
        writer = PoolWriter(out, run_record(model, config, model_name, checkpoint), rank=rank.rank)
        done = rank.on_main(writer.open)
    try:
        results: dict[int, tuple[BatchResult, dict]] = {}
        todo = sorted(set(range(num_batches)) - set(done))
        for b in rank.share(todo):
            chunk = labels[b * config.batch_size : (b + 1) * config.batch_size]
            where = f" (rank {rank.rank})" if rank.active else ""
            result = invert_batch(
                model,
                torch.tensor(chunk, device=device),
                config,
                seed=config.seed * 1_000_003 + b,
                progress=progress and rank.is_main,
                desc=f"batch {b + 1}/{num_batches}{where}",
            )
            stats = {
                "index": b,
                "size": len(chunk),
                "wall_seconds": result.wall_seconds,
                "seconds_per_phase": result.seconds_per_phase,
                "tokens_per_phase": result.tokens_per_phase,
                "final_seconds": result.final_seconds,
                "num_correct": int(result.correct.sum()),
                "rank": rank.rank,
            }
            if writer is not None:
                writer.add_batch(b, result.images, result.labels, result.kept_patches, result.target_prob, stats,
                                 detached_at=result.detached_at)
            else:
                results[b] = (result, stats)
        if writer is not None:
            writer.wait()  # this rank's last commits, before rank 0 merges them
            rank_seconds = rank.all_gather(time.perf_counter() - run_start)  # also waits for every rank's batches
            pool = None

            def finish() -> dict:
                nonlocal pool
                writer.merge()  # the other ranks' last batches, so the picture shows every image
                pool = read_pool(out)
                name = class_namer(model)
                extra = {"world_size": rank.world_size, "per_rank_seconds": rank_seconds,
                         "elapsed_seconds": time.perf_counter() - run_start}
                return writer.finish(image_grid_png(pool.images, [name(c) for c in pool.labels]), **extra)

            run = rank.on_main(finish)
            if pool is None:  # the other ranks read the pool rank 0 finished
                pool = read_pool(out)
            return InversionResult(pool.images, pool.labels, pool.kept_patches, pool.target_prob, run, pool.detached_at)
    finally:
        if writer is not None:
            writer.close()
    for gathered in rank.all_gather(results):  # every rank's batches (one's own alone in a single process)
        results.update(gathered)
    ordered = [results[b] for b in range(num_batches)]
    run = run_record(model, config, model_name, checkpoint)
    run.update(summarise_batches([stats for _, stats in ordered]))
    return InversionResult(
        images=torch.cat([r.images for r, _ in ordered]),
        labels=torch.cat([r.labels for r, _ in ordered]),
        kept_patches=torch.cat([r.kept_patches for r, _ in ordered]),
        target_prob=torch.cat([r.target_prob for r, _ in ordered]),
        run=run,
        detached_at=None if ordered[0][0].detached_at is None else torch.cat([r.detached_at for r, _ in ordered]),
    )
