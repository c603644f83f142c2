"""The pool: the one on-disk format of synthetic images, read and written here only.

A pool folder holds::

    images/NNNNNN.png   8-bit RGB, de-normalised, stopped patches black
    manifest.jsonl      one line per image: file, label, kept_patches, target_prob
                        (rebirth pools also detached_at: per patch, row-major, the step
                        it was detached at)
    run.json            model, settings, timings per phase, success rate, environment
    grid.png            the images with their class names, for a person to look at
    parts/NNNNNN.json   while a run is going: finished batches not merged yet

Image ``i`` is made in batch ``i // batch_size`` and written as ``images/{i:06d}.png``,
whichever process makes it. A finished batch is committed atomically: its PNGs, then
its part file (its manifest lines and statistics), each through a temporary file and a
rename. Rank 0 (the only process of a plain run) merges parts into ``manifest.jsonl``
and ``run.json`` and deletes them. So an interrupted run, with one process or many,
loses at most the batches in flight, and the same command continues it with any
number of processes.

Commits run on a background thread, in order, while the next batch inverts (PNG
encoding releases the GIL, and a GPU would otherwise idle through it); the writer
waits for them before it merges for good, reports, or lets the folder go.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sparseinv.errors import UsageError, first_line
from sparseinv.files import FolderLock, atomic_save, atomic_write, atomic_write_json, check_writable

FORMAT = "sparseinv-pool/1"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] to (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_image(path: Path) -> torch.Tensor:
    """An RGB image file as a (3, H, W) float tensor in [0, 1].

    Raises:
        UsageError: the file is missing, unreadable, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UsageError(f"image '{path}' does not exist.") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL reports damage as any of these
        raise UsageError(f"image '{path}' cannot be read ({first_line(err)}).") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


@dataclass
class Pool:
    """A pool read back into memory.

    Attributes:
        root: The pool folder.
        images: (N, 3, H, W) pixels in [0, 1] (stopped patches are zero).
        labels: (N,) classes the images were inverted towards.
        kept_patches: (N, K) kept patch indices, sorted; all patches for dense pools.
        target_prob: (N,) the inverting model's probability of each label.
        run: The run record (``run.json``).
        detached_at: (N, num_patches) rebirth pools only: the step each patch was
            detached at (frozen into the image); ``None`` for other pools.
    """

    root: Path
    images: torch.Tensor
    labels: torch.Tensor
    kept_patches: torch.Tensor
    target_prob: torch.Tensor
    run: dict
    detached_at: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def model_name(self) -> str:
        return self.run["model"]

    @property
    def is_sparse(self) -> bool:
        return self.kept_patches.shape[1] < self.run["num_patches"]

    @property
    def record(self) -> "PoolRecord":
        return PoolRecord.from_run(self.run, self.root)


def check_weights(root: Path, run: dict, model: nn.Module, role: str, allow_other: bool = False) -> None:
    """Refuse a pool whose record names other weights than ``model``'s, unless ``allow_other``.

    Inverting from random weights and calibrating the real checkpoint, or distilling a
    teacher from another checkpoint's pool, is sometimes meant; it must never pass unnoticed.
    A pool made before weights were recorded cannot be checked and is accepted.
    """
    from sparseinv.models import weights_fingerprint

    recorded = run.get("weights")
    if recorded is None or recorded == weights_fingerprint(model):
        return
    where = f"pool '{root}' was inverted from other weights of {run['model']} than the {role}'s"
    if not allow_other:
        raise UsageError(f"{where}; pass --allow-other-weights if that is what you mean.")
    print(f"sparseinv: note: {where} (allowed).", file=sys.stderr)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{what} '{path}' is damaged: not valid JSON ({first_line(err)}).") from None
    except OSError as err:
        raise UsageError(f"{what} '{path}' cannot be read ({first_line(err)}).") from None


# A manifest line's fields and the types each must have.
_ENTRY_FIELDS = {"file": (str,), "label": (int,), "kept_patches": (list,), "target_prob": (int, float)}


def _checked_entry(entry, where: str) -> dict:
    """``entry`` if it is a manifest line's object with every field of the right type."""
    if not isinstance(entry, dict):
        raise UsageError(f"{where} is damaged: not a JSON object.")
    for field, types in _ENTRY_FIELDS.items():
        value = entry.get(field)
        if not isinstance(value, types) or isinstance(value, bool):
            problem = "lacks" if field not in entry else "has a wrong"
            raise UsageError(f"{where} is damaged: it {problem} '{field}' field.")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in entry["kept_patches"]):
        raise UsageError(f"{where} is damaged: 'kept_patches' must be patch indices.")
    return entry


def read_manifest(root: Path) -> list[dict]:
    """The manifest's entries, each checked for its fields and their types; [] if there is none.

    Raises:
        UsageError: a line that is not JSON, or lacks a field, or has one of the wrong type.
    """
    path = Path(root) / "manifest.jsonl"
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"pool manifest '{path}' cannot be read ({first_line(err)}).") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"pool manifest '{path}' line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{where} is damaged: not valid JSON.") from None
        entries.append(_checked_entry(entry, where))
    return entries


def read_run(root: Path) -> dict | None:
    """The pool's run record, or ``None`` if the folder has no ``run.json``.

    Raises:
        UsageError: ``run.json`` exists but is not a JSON object.
    """
    path = Path(root) / "run.json"
    if not path.is_file():
        return None
    run = _read_json(path, "pool record")
    if not isinstance(run, dict):
        raise UsageError(f"pool record '{path}' is damaged: not a JSON object.")
    return run


def _check_run(root: Path, run: dict | None) -> None:
    if run is None:
        raise UsageError(f"'{root}' is not a sparseinv pool (no run.json).")
    fmt = run.get("format")
    if isinstance(fmt, str) and fmt.startswith("sparseinv-pool/") and fmt != FORMAT:
        raise UsageError(f"pool '{root}' was written in format {fmt}, which this sparseinv ({FORMAT}) cannot read; upgrade sparseinv.")
    if fmt != FORMAT:
        raise UsageError(f"'{root}' is not a sparseinv pool (its run.json is not of format {FORMAT}).")
    for key, kind in (("model", str), ("num_patches", int), ("num_classes", int), ("input_size", list)):
        if not isinstance(run.get(key), kind):
            raise UsageError(f"pool record '{root / 'run.json'}' is damaged: it lacks a valid '{key}'.")


def _check_entry(root: Path, run: dict, number: int, entry: dict) -> None:
    """Refuse an entry that names a file outside the pool, a label or patch the model lacks."""
    where = f"pool manifest '{root / 'manifest.jsonl'}' line {number}"
    file = Path(entry["file"])
    if file.is_absolute() or ".." in file.parts:
        raise UsageError(f"{where} names '{file}', which is outside the pool.")
    if not 0 <= entry["label"] < run["num_classes"]:
        raise UsageError(f"{where} has label {entry['label']}, but {run['model']} has classes 0..{run['num_classes'] - 1}.")
    kept = entry["kept_patches"]
    if not kept or min(kept) < 0 or max(kept) >= run["num_patches"]:
        raise UsageError(f"{where} has kept patches outside 0..{run['num_patches'] - 1}.")
    if len(set(kept)) != len(kept):
        raise UsageError(f"{where} repeats a kept patch.")
    if "detached_at" in entry:  # rebirth pools: one step per patch of the grid
        steps = entry["detached_at"]
        if not (isinstance(steps, list) and len(steps) == run["num_patches"]
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in steps)):
            raise UsageError(f"{where} is damaged: 'detached_at' must be one step per patch ({run['num_patches']}).")


def entry_check(entry: dict) -> str:
    """A manifest line's check: a hash of its other fields, written with it.

    The ranges above cannot see a value changed to another valid one (a kept patch to
    another patch, a label to another class); the check can. Lines written before checks
    existed have none and are read as they are.
    """
    body = {k: v for k, v in entry.items() if k != "check"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _verify_check(entry: dict, where: str) -> None:
    if "check" in entry and entry["check"] != entry_check(entry):
        raise UsageError(f"{where} is damaged: its fields do not match the check written with them.")


@dataclass(frozen=True)
class PoolRecord:
    """The typed part of a pool's ``run.json``: what made it and the shape of its images.

    Attributes:
        model: The timm name of the model the pool was inverted from.
        checkpoint: That model's weights file, if one was given.
        num_classes: The model's class count (labels are below it).
        num_patches: Patches of a whole image (a dense image keeps them all).
        patch_size: (height, width) of a patch in pixels.
        input_size: (channels, height, width) of an image.
        settings: The inversion settings as recorded (:meth:`InversionConfig.record`); the
            runs layer rebuilds them (:func:`sparseinv.runs.inversion.pool_settings`), so
            the format never reaches up into the engine that writes it.
    """

    model: str
    checkpoint: str | None
    num_classes: int
    num_patches: int
    patch_size: tuple[int, int]
    input_size: tuple[int, int, int]
    settings: dict

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.input_size[1] // self.patch_size[0], self.input_size[2] // self.patch_size[1])

    @classmethod
    def from_run(cls, run: dict, root: Path | None = None) -> "PoolRecord":
        """Read ``run.json``'s fields (already checked by :func:`open_pool`)."""
        return cls(
            model=run["model"],
            checkpoint=run.get("checkpoint"),
            num_classes=int(run["num_classes"]),
            num_patches=int(run["num_patches"]),
            patch_size=tuple(int(p) for p in run["patch_size"]),
            input_size=tuple(int(s) for s in run["input_size"]),
            settings=dict(run.get("settings") or {}),
        )


@dataclass(frozen=True)
class PoolIndex:
    """A pool's record and manifest, checked, without its pixels (see :func:`open_pool`).

    Attributes:
        root: The pool folder.
        run: ``run.json`` as written.
        entries: The manifest's lines, each checked against the record.
    """

    root: Path
    run: dict
    entries: list[dict]

    @functools.cached_property
    def record(self) -> PoolRecord:
        return PoolRecord.from_run(self.run, self.root)

    @property
    def num_kept(self) -> int:
        return len(self.entries[0]["kept_patches"])

    @property
    def is_sparse(self) -> bool:
        return self.num_kept < self.run["num_patches"]

    def __len__(self) -> int:
        return len(self.entries)

    def check_headers(self) -> None:
        """Every image file opens as an image of the pool's size (headers only; pixels are read later).

        Raises:
            UsageError: a missing, unreadable or wrongly sized image, named.
        """
        size = tuple(self.run["input_size"][1:])
        for entry in self.entries:
            path = self.root / entry["file"]
            try:
                with Image.open(path) as img:
                    found = (img.height, img.width)
            except FileNotFoundError:
                raise UsageError(f"image '{path}' does not exist.") from None
            except (OSError, ValueError, SyntaxError) as err:
                raise UsageError(f"image '{path}' cannot be read ({first_line(err)}).") from None
            if found != size:
                raise UsageError(f"image '{path}' is not {size[0]}x{size[1]} pixels, the size {self.run['model']} was inverted at.")

    def read(self, i: int) -> torch.Tensor:
        """Image ``i`` as (3, H, W) floats in [0, 1], checked for the pool's size."""
        image = read_image(self.root / self.entries[i]["file"])
        size = tuple(self.run["input_size"][1:])
        if tuple(image.shape[1:]) != size:
            raise UsageError(f"image '{self.root / self.entries[i]['file']}' is not {size[0]}x{size[1]} pixels, "
                             f"the size {self.run['model']} was inverted at.")
        return image


def open_pool(root: str | os.PathLike) -> PoolIndex:
    """A pool folder's record and manifest, every line checked; the images are read on demand.

    Raises:
        UsageError: not a pool, a pool with no images, or a damaged record or manifest.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"pool '{root}' does not exist.")
    run = read_run(root)
    _check_run(root, run)
    entries = read_manifest(root)
    if not entries:
        raise UsageError(f"pool '{root}' holds no images yet.")
    for number, entry in enumerate(entries, 1):
        _check_entry(root, run, number, entry)
    if len({len(e["kept_patches"]) for e in entries}) > 1:
        raise UsageError(f"pool manifest '{root / 'manifest.jsonl'}' is damaged: its images keep different numbers of patches.")
    # Last: the checks catch what every range above passes (a value changed to another valid one).
    for number, entry in enumerate(entries, 1):
        _verify_check(entry, f"pool manifest '{root / 'manifest.jsonl'}' line {number}")
    return PoolIndex(root, run, entries)


def open_pools(pools, model_name: str | None = None, model: nn.Module | None = None, *, role: str = "model",
               allow_other_weights: bool = False) -> list[PoolIndex]:
    """Pools opened for a model: the one place a set of pools is checked before it is used.

    Each pool is opened and checked (:func:`open_pool`); then, in this order, each must have
    been inverted from ``model_name`` (when given); all from one model at one size; from
    ``model``'s weights (unless ``allow_other_weights``: see :func:`check_weights`) and
    class count (when ``model`` is given); and every image must open at the pool's size
    (headers only: pixels are read when used).

    Args:
        pools: A pool folder, :class:`Pool` or :class:`PoolIndex`, or a sequence of them.
        role: What the model is to the command (``"teacher"``), for the messages.

    Raises:
        UsageError: no pool, or a pool that fails any check, named.
    """
    items = pools if isinstance(pools, Sequence) and not isinstance(pools, str) else [pools]
    opened = [p if isinstance(p, PoolIndex) else open_pool(p.root if isinstance(p, Pool) else p) for p in items]
    if not opened:
        raise UsageError("no pool was given.")
    for pool in opened:
        if model_name is not None and pool.run["model"] != model_name:
            raise UsageError(f"pool '{pool.root}' was inverted from {pool.run['model']}, not from the {role} {model_name}.")
    first = opened[0].record
    for pool in opened[1:]:
        rec = pool.record
        if (rec.model, rec.input_size, rec.patch_size, rec.num_classes) != (first.model, first.input_size, first.patch_size, first.num_classes):
            raise UsageError(f"pool '{pool.root}' was inverted from another model or at another size than '{opened[0].root}'.")
    for pool in [] if model is None else opened:
        check_weights(pool.root, pool.run, model, role, allow_other_weights)
        if pool.record.num_classes != int(model.num_classes):
            raise UsageError(f"pool '{pool.root}' was inverted from a {pool.record.num_classes}-class model, "
                             f"but the {role} has {int(model.num_classes)} classes.")
    for pool in opened:
        pool.check_headers()  # a missing or wrongly sized image is refused now, not mid-run
    return opened


def read_pool(root: str | os.PathLike) -> Pool:
    """Load a pool folder written by :class:`PoolWriter`, checking every part of it.

    Raises:
        UsageError: not a pool, a pool with no images, or a damaged one (a record or
            manifest line that does not parse, a missing or unreadable image, a label or
            patch index the model does not have, images of different sizes).
    """
    index = open_pool(root)
    entries = index.entries
    return Pool(
        root=index.root,
        images=torch.stack([index.read(i) for i in range(len(entries))]),
        labels=torch.tensor([e["label"] for e in entries]),
        kept_patches=torch.tensor([e["kept_patches"] for e in entries]),
        target_prob=torch.tensor([float(e["target_prob"]) for e in entries]),
        run=index.run,
        detached_at=torch.tensor([e["detached_at"] for e in entries]) if all("detached_at" in e for e in entries) else None,
    )


def _valid_batches(batches) -> bool:
    return isinstance(batches, list) and all(
        isinstance(b, dict) and isinstance(b.get("size"), int) and b["size"] >= 0 and isinstance(b.get("index", 0), int)
        for b in batches
    )


def _batch_index(stats: dict, position: int) -> int:
    # Pools written before batches were distributed listed them in order, some without an index.
    return int(stats.get("index", position))


def summarise_batches(batches: list[dict]) -> dict:
    """Run totals from per-batch statistics (``size``, ``wall_seconds``, ``seconds_per_phase``,
    ``tokens_per_phase``, ``num_correct``); batches of a continued run add up."""
    images = sum(b["size"] for b in batches)
    return {
        "num_images": images,
        "wall_seconds": sum(b["wall_seconds"] for b in batches),
        "seconds_per_phase": [sum(col) for col in zip(*(b["seconds_per_phase"] for b in batches))],
        "tokens_per_phase": batches[0]["tokens_per_phase"] if batches else [],
        "success_rate": sum(b["num_correct"] for b in batches) / max(1, images),
    }


class PoolWriter:
    """Writes batches to a pool folder and continues an interrupted one.

    In a run of several processes every rank writes the batches it makes
    (:meth:`add_batch`); rank 0 alone opens, locks, merges and finishes the pool.

    Args:
        root: The pool folder; created if missing.
        run: The run record: ``model``, ``settings`` (what must match to continue; its
            ``batch_size`` names the image files), and anything else worth keeping.
            Batch statistics are added here.
        rank: This process's rank; only rank 0 merges.
    """

    def __init__(self, root: str | os.PathLike, run: dict, rank: int = 0) -> None:
        self.root = Path(root)
        self.run = {"format": FORMAT, **run, "batches": [], "complete": False}
        self.batch_size = int(run["settings"]["batch_size"])
        self.rank = rank
        self.entries: list[dict] = []
        self._lock = FolderLock(self.root)
        # One committer keeps batches in order; encoders share each batch's PNGs.
        self._committer: ThreadPoolExecutor | None = None
        self._encoders: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    def check(self) -> None:
        """Raise :class:`UsageError` if ``root`` holds something this run must not touch."""
        check_writable(self.root, folder=True)
        existing = read_run(self.root) if self.root.is_dir() else None
        if existing is None:
            # A lock file alone is what a run killed before its first record leaves.
            if self.root.is_dir() and any(p.name != ".lock" for p in self.root.iterdir()):
                raise UsageError(f"--out '{self.root}' is a non-empty folder that is not a sparseinv pool.")
            return
        _check_run(self.root, existing)
        settings = existing.get("settings")
        if not isinstance(settings, dict) or not _valid_batches(existing.get("batches")):
            raise UsageError(f"pool record '{self.root / 'run.json'}' is damaged; choose another folder.")
        if existing.get("model") != self.run["model"] or settings != self.run["settings"]:
            diff = sorted(k for k in set(settings) | set(self.run["settings"]) if settings.get(k) != self.run["settings"].get(k))
            what = "model" if existing.get("model") != self.run["model"] else ", ".join(diff)
            raise UsageError(f"--out '{self.root}' holds a pool made with different settings ({what}); choose another folder.")
        if existing.get("weights") not in (None, self.run.get("weights")):
            raise UsageError(f"--out '{self.root}' holds a pool inverted from other weights of {self.run['model']}; choose another folder.")

    def _batch_of(self, entry: dict) -> int | None:
        stem = Path(entry["file"]).stem
        return int(stem) // self.batch_size if stem.isdigit() else None

    def open(self) -> list[int]:
        """Lock the folder, create or reopen it, merge the parts an interrupted run left.

        Returns:
            The indices of the batches already done.

        Raises:
            UsageError: the folder is not this run's to write, is damaged, or another
                process is writing it.
        """
        self.check()
        self._lock.acquire()
        try:
            existing = read_run(self.root)
            if existing is not None:
                self.run["batches"] = [{**b, "index": _batch_index(b, i)} for i, b in enumerate(existing["batches"])]
                committed = sum(b["size"] for b in self.run["batches"])
                recorded = {b["index"] for b in self.run["batches"]}
                # Lines past the record are from a merge cut short: their batch is redone or still in parts/.
                listed = read_manifest(self.root)
                self.entries = [e for e in listed if self._batch_of(e) in recorded]
                if len(self.entries) < committed:
                    raise UsageError(f"pool manifest '{self.root / 'manifest.jsonl'}' lists {len(listed)} images, but run.json records {committed}; "
                                     "the pool is damaged, choose another folder.")
            (self.root / "images").mkdir(exist_ok=True)
            self.parts.mkdir(exist_ok=True)
            self.merge()
        except BaseException:
            self.close()
            raise
        return sorted(b["index"] for b in self.run["batches"])

    def close(self) -> None:
        """Finish the commits under way, then release the folder (without marking the pool complete).

        A batch already inverted is worth the moment its commit takes, also when the run
        is being interrupted; a commit that failed is not raised again here.
        """
        try:
            for future in self._pending:
                future.exception()
            self._pending = []
            for pool in (self._committer, self._encoders):
                if pool is not None:
                    pool.shutdown()
            self._committer = self._encoders = None
        finally:
            self._lock.release()

    def add_batch(self, index: int, images: torch.Tensor, labels, kept_patches, target_prob, stats: dict,
                  detached_at=None) -> None:
        """Commit batch ``index`` in the background: its PNGs, then its part file; rank 0 then merges.

        ``detached_at`` (B, num_patches), for rebirth runs, adds each image's detachment steps to its line.

        Returns at once; a failure of an earlier commit is raised here (or by :meth:`wait`).
        At most one batch waits behind the one being written, so memory stays bounded.
        """
        self._raise_failed()
        while len(self._pending) > 1:
            self._pending.pop(0).result()
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="pool-commit")
            self._encoders = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="pool-png")
        arrays = to_uint8(images)
        entries = [
            {
                "file": f"images/{index * self.batch_size + offset:06d}.png",
                "label": int(labels[offset]),
                "kept_patches": [int(i) for i in kept_patches[offset]],
                "target_prob": round(float(target_prob[offset]), 6),
            }
            for offset in range(len(arrays))
        ]
        if detached_at is not None:
            for offset, entry in enumerate(entries):
                entry["detached_at"] = [int(t) for t in detached_at[offset]]
        for entry in entries:
            entry["check"] = entry_check(entry)
        part = {"index": index, "entries": entries, "stats": {**stats, "index": index}}
        self._pending.append(self._committer.submit(self._commit, arrays, part))

    def _commit(self, arrays: np.ndarray, part: dict) -> None:
        def save(array: np.ndarray, entry: dict) -> None:
            atomic_save(self.root / entry["file"], lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))

        list(self._encoders.map(save, arrays, part["entries"]))  # list() re-raises the first failure
        atomic_write_json(self.parts / f"{part['index']:06d}.json", part)
        if self.rank == 0:
            self.merge()

    def _raise_failed(self) -> None:
        for future in self._pending:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def wait(self) -> None:
        """Block until every batch handed to :meth:`add_batch` is committed; raise the first failure."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _read_part(self, path: Path) -> dict:
        """A part file, checked; a damaged one is refused with what to do about it."""
        fix = "; delete it and run the same command again (its batch is made again)."
        try:
            part = _read_json(path, "pool part")
            where = f"pool part '{path}'"
            num_batches = -(-int(self.run["settings"]["num_images"]) // self.batch_size)
            if not (isinstance(part, dict) and isinstance(part.get("index"), int) and 0 <= part["index"] < num_batches
                    and isinstance(part.get("entries"), list) and isinstance(part.get("stats"), dict)
                    and part["stats"].get("size") == len(part["entries"])):
                raise UsageError(f"{where} is damaged")
            for number, entry in enumerate(part["entries"], 1):
                _checked_entry(entry, f"{where} entry {number}")
                _verify_check(entry, f"{where} entry {number}")
                if self._batch_of(entry) != part["index"]:
                    raise UsageError(f"{where} names an image of another batch")
        except UsageError as err:
            raise UsageError(str(err).rstrip(".") + fix) from None
        return part

    def merge(self) -> None:
        """Fold the finished batches in ``parts/`` into the manifest and run record (rank 0)."""
        recorded = {b["index"] for b in self.run["batches"]}
        merged = sorted(self.parts.glob("*.json")) if self.parts.is_dir() else []
        for path in merged:
            part = self._read_part(path)
            if part["index"] not in recorded:  # else: merged before an interruption, not yet deleted
                recorded.add(part["index"])
                self.entries.extend(part["entries"])
                self.run["batches"].append(part["stats"])
        self.entries.sort(key=lambda e: e["file"])
        self.run["batches"].sort(key=lambda b: b["index"])
        atomic_write(self.root / "manifest.jsonl", "".join(json.dumps(e) + "\n" for e in self.entries).encode())
        self.run.update(summarise_batches(self.run["batches"]))
        atomic_write_json(self.root / "run.json", self.run)
        for path in merged:
            path.unlink()

    def finish(self, grid_png: bytes | None = None, **record) -> dict:
        """Merge what is left, mark the pool complete, write its picture; return the run record.

        Args:
            grid_png: The picture of the images.
            **record: More entries for ``run.json`` (e.g. per-rank wall times).
        """
        self.wait()
        self.merge()
        self.run.update(record, complete=True)
        if grid_png is not None:
            atomic_write(self.root / "grid.png", grid_png)
        atomic_write_json(self.root / "run.json", self.run)
        with contextlib.suppress(OSError):
            self.parts.rmdir()
        self.close()
        return self.run
