"""The pool: the one on-disk format of synthetic images, read and written here only.

A pool folder holds::

    images/NNNNNN.png   8-bit RGB, de-normalised, stopped patches black
    manifest.jsonl      one line per image: file, label, kept_patches, target_prob
    run.json            model, settings, timings per phase, success rate, environment
    grid.png            the images with their class names, for a person to look at

Batches are committed atomically (images first, then the manifest, each through a
temporary file and a rename), so an interrupted run loses at most the batch in flight
and the same command continues it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
    """

    root: Path
    images: torch.Tensor
    labels: torch.Tensor
    kept_patches: torch.Tensor
    target_prob: torch.Tensor
    run: dict

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def model_name(self) -> str:
        return self.run["model"]

    @property
    def is_sparse(self) -> bool:
        return self.kept_patches.shape[1] < self.run["num_patches"]

    def check_model(self, model_name: str, role: str = "model") -> None:
        """Refuse a pool inverted from another architecture than ``model_name``."""
        if self.model_name != model_name:
            raise UsageError(
                f"pool '{self.root}' was inverted from {self.model_name}, not from the {role} {model_name}."
            )


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{what} '{path}' is damaged: not valid JSON ({first_line(err)}).") from None
    except OSError as err:
        raise UsageError(f"{what} '{path}' cannot be read ({first_line(err)}).") from None


# A manifest line's fields and the types each must have.
_ENTRY_FIELDS = {"file": (str,), "label": (int,), "kept_patches": (list,), "target_prob": (int, float)}


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
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"pool manifest '{path}' line {number} is damaged: not valid JSON.") from None
        if not isinstance(entry, dict):
            raise UsageError(f"pool manifest '{path}' line {number} is damaged: not a JSON object.")
        for field, types in _ENTRY_FIELDS.items():
            value = entry.get(field)
            if not isinstance(value, types) or isinstance(value, bool):
                problem = "lacks" if field not in entry else "has a wrong"
                raise UsageError(f"pool manifest '{path}' line {number} is damaged: it {problem} '{field}' field.")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in entry["kept_patches"]):
            raise UsageError(f"pool manifest '{path}' line {number} is damaged: 'kept_patches' must be patch indices.")
        entries.append(entry)
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


def read_pool(root: str | os.PathLike) -> Pool:
    """Load a pool folder written by :class:`PoolWriter`, checking every part of it.

    Raises:
        UsageError: not a pool, a pool with no images, or a damaged one (a record or
            manifest line that does not parse, a missing or unreadable image, a label or
            patch index the model does not have, images of different sizes).
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
    images = [read_image(root / e["file"]) for e in entries]
    size = tuple(run["input_size"][1:])
    wrong = next((e["file"] for e, img in zip(entries, images) if tuple(img.shape[1:]) != size), None)
    if wrong is not None:
        raise UsageError(f"image '{root / wrong}' is not {size[0]}x{size[1]} pixels, the size {run['model']} was inverted at.")
    return Pool(
        root=root,
        images=torch.stack(images),
        labels=torch.tensor([e["label"] for e in entries]),
        kept_patches=torch.tensor([e["kept_patches"] for e in entries]),
        target_prob=torch.tensor([float(e["target_prob"]) for e in entries]),
        run=run,
    )


def _valid_batches(batches) -> bool:
    return isinstance(batches, list) and all(
        isinstance(b, dict) and isinstance(b.get("size"), int) and b["size"] >= 0 for b in batches
    )


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

    Args:
        root: The pool folder; created if missing.
        run: The run record: ``model``, ``settings`` (what must match to continue),
            and anything else worth keeping. Batch statistics are added here.
    """

    def __init__(self, root: str | os.PathLike, run: dict) -> None:
        self.root = Path(root)
        self.run = {"format": FORMAT, **run, "batches": [], "complete": False}
        self.entries: list[dict] = []
        self._lock = FolderLock(self.root)

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

    def open(self) -> int:
        """Lock the folder, create or reopen it; return how many images are already done.

        Raises:
            UsageError: the folder is not this run's to write, is damaged, or another
                process is writing it.
        """
        self.check()
        self._lock.acquire()
        try:
            existing = read_run(self.root)
            if existing is not None:
                self.run["batches"] = existing["batches"]
                committed = sum(b["size"] for b in self.run["batches"])
                entries = read_manifest(self.root)
                if len(entries) < committed:
                    raise UsageError(f"pool manifest '{self.root / 'manifest.jsonl'}' lists {len(entries)} images, but run.json records {committed}; "
                                     "the pool is damaged, choose another folder.")
                self.entries = entries[:committed]
                self.run.update(summarise_batches(self.run["batches"]))
            atomic_write_json(self.root / "run.json", self.run)
            (self.root / "images").mkdir(exist_ok=True)
        except BaseException:
            self.close()
            raise
        return len(self.entries)

    def close(self) -> None:
        """Release the folder (without marking the pool complete)."""
        self._lock.release()

    def add_batch(self, images: torch.Tensor, labels, kept_patches, target_prob, stats: dict) -> None:
        """Commit one batch: its PNGs, then its manifest lines and statistics."""
        start = len(self.entries)
        for offset, array in enumerate(to_uint8(images)):
            name = f"images/{start + offset:06d}.png"
            atomic_save(self.root / name, lambda tmp, array=array: Image.fromarray(array).save(tmp, format="PNG"))
            self.entries.append(
                {
                    "file": name,
                    "label": int(labels[offset]),
                    "kept_patches": [int(i) for i in kept_patches[offset]],
                    "target_prob": round(float(target_prob[offset]), 6),
                }
            )
        lines = "".join(json.dumps(e) + "\n" for e in self.entries)
        atomic_write(self.root / "manifest.jsonl", lines.encode())
        self.run["batches"].append(stats)
        self.run.update(summarise_batches(self.run["batches"]))
        atomic_write_json(self.root / "run.json", self.run)

    def finish(self, grid_png: bytes | None = None) -> dict:
        """Mark the pool complete and write its picture; return the run record."""
        self.run["complete"] = True
        if grid_png is not None:
            atomic_write(self.root / "grid.png", grid_png)
        atomic_write_json(self.root / "run.json", self.run)
        self.close()
        return self.run
