"""Inverting a run: many batches, dealt to the ranks, kept in memory or written as a pool.

:func:`invert` is the loop around the engine's :func:`~sparseinv.inversion.loop.invert_batch`:
it chooses every image's label, seeds each batch, deals the batches still to do to the
processes of a ``torchrun`` run, commits each to the pool as it is done, and has rank 0
merge the pool and draw its grid.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sparseinv import distributed
from sparseinv.inversion import loop
from sparseinv.inversion.config import InversionConfig
from sparseinv.inversion.loop import BatchResult
from sparseinv.inversion.precision import resolve_precision
from sparseinv.models import vit_info, weights_fingerprint
from sparseinv.errors import UsageError
from sparseinv.pool import PoolIndex, PoolWriter, read_pool, summarise_batches


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


def run_record(model: nn.Module, config: InversionConfig, model_name: str | None, checkpoint: str | None,
               cuda_graphs: bool = False) -> dict:
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
        "cuda_graphs": cuda_graphs,
    }


def pool_settings(pool: PoolIndex) -> InversionConfig:
    """The settings ``pool`` was inverted with, every one, rebuilt from its record, to invert more "like this pool".

    Raises:
        UsageError: a record whose settings cannot be rebuilt (:meth:`InversionConfig.from_record`).
    """
    try:
        return InversionConfig.from_record(pool.record.settings)
    except UsageError as err:
        raise UsageError(f"pool record '{pool.root}/run.json': {err}") from None


def invert(
    model: nn.Module,
    config: InversionConfig,
    out: str | None = None,
    *,
    model_name: str | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
    cuda_graphs: bool = False,
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

    ``cuda_graphs``: replay each phase's step as a captured CUDA graph (a CUDA model only;
    see :func:`~sparseinv.inversion.loop.invert_batch`). It changes the speed, not the
    images, so it is not one of the pool's settings.

    Raises:
        UsageError: bad settings, or ``out`` holding a pool made with other settings.
    """
    run_start = time.perf_counter()
    config.validate(vit_info(model).num_classes)
    check_cuda_graphs(cuda_graphs, next(model.parameters()).device)
    if out is None:
        return _invert_in_memory(model, config, model_name, checkpoint, progress, cuda_graphs)
    return _invert_into_pool(model, config, out, model_name, checkpoint, progress, run_start, cuda_graphs)


def check_cuda_graphs(cuda_graphs: bool, device: torch.device) -> None:
    """Refuse CUDA graphs for a model that is not on a CUDA device."""
    if cuda_graphs and torch.device(device).type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device (--device cuda); this run is on {device}.")


def _invert_batches(model: nn.Module, config: InversionConfig, todo: list[int], progress: bool,
                    cuda_graphs: bool = False) -> Iterator[tuple[int, BatchResult, dict]]:
    """This rank's share of the batches ``todo``, inverted one by one: (index, result, statistics)."""
    labels = assign_labels(config, vit_info(model).num_classes)
    device = next(model.parameters()).device
    rank = distributed.current()
    num_batches = -(-config.num_images // config.batch_size)
    for b in rank.share(todo):
        chunk = labels[b * config.batch_size : (b + 1) * config.batch_size]
        where = f" (rank {rank.rank})" if rank.active else ""
        # Called through the module, so a test (or a benchmark) that replaces it there is heard.
        result = loop.invert_batch(
            model,
            torch.tensor(chunk, device=device),
            config,
            seed=config.seed * 1_000_003 + b,
            progress=progress and rank.is_main,
            desc=f"batch {b + 1}/{num_batches}{where}",
            cuda_graphs=cuda_graphs,
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
        yield b, result, stats


def _invert_in_memory(model: nn.Module, config: InversionConfig, model_name: str | None, checkpoint: str | None,
                      progress: bool, cuda_graphs: bool = False) -> InversionResult:
    """Every batch, gathered from every rank (one's own alone in a single process)."""
    rank = distributed.current()
    num_batches = -(-config.num_images // config.batch_size)
    results = {b: (result, stats) for b, result, stats in _invert_batches(model, config, list(range(num_batches)), progress, cuda_graphs)}
    for gathered in rank.all_gather(results):
        results.update(gathered)
    ordered = [results[b] for b in range(num_batches)]
    run = run_record(model, config, model_name, checkpoint, cuda_graphs)
    run.update(summarise_batches([stats for _, stats in ordered]))
    return InversionResult(
        images=torch.cat([r.images for r, _ in ordered]),
        labels=torch.cat([r.labels for r, _ in ordered]),
        kept_patches=torch.cat([r.kept_patches for r, _ in ordered]),
        target_prob=torch.cat([r.target_prob for r, _ in ordered]),
        run=run,
        detached_at=None if ordered[0][0].detached_at is None else torch.cat([r.detached_at for r, _ in ordered]),
    )


def _invert_into_pool(model: nn.Module, config: InversionConfig, out: str, model_name: str | None, checkpoint: str | None,
                      progress: bool, run_start: float, cuda_graphs: bool = False) -> InversionResult:
    """The batches ``out`` does not hold yet, each committed when done; rank 0 merges and draws the grid."""
    from sparseinv.viz import class_namer, image_grid_png  # matplotlib, only when there is a grid to draw

    rank = distributed.current()
    num_batches = -(-config.num_images // config.batch_size)
    writer = PoolWriter(out, run_record(model, config, model_name, checkpoint, cuda_graphs), rank=rank.rank)
    done = rank.on_main(writer.open)
    try:
        todo = sorted(set(range(num_batches)) - set(done))
        for b, result, stats in _invert_batches(model, config, todo, progress, cuda_graphs):
            writer.add_batch(b, result.images, result.labels, result.kept_patches, result.target_prob, stats,
                             detached_at=result.detached_at)
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
        writer.close()
