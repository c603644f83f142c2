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

from sparseinv.errors import UsageError

FORMAT = "sparseinv-pool/1"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] to (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_image(path: Path) -> torch.Tensor:
    """An RGB image file as a (3, H, W) float tensor in [0, 1]."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
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


def read_manifest(root: Path) -> list[dict]:
    path = Path(root) / "manifest.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(root: Path) -> dict | None:
    path = Path(root) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_pool(root: str | os.PathLike) -> Pool:
    """Load a pool folder written by :class:`PoolWriter`.

    Raises:
        UsageError: not a pool, or a pool with no images.
    """
    root = Path(root)
    run = read_run(root)
    if run is None or run.get("format") != FORMAT:
        raise UsageError(f"'{root}' is not a sparseinv pool (no run.json of format {FORMAT}).")
    entries = read_manifest(root)
    if not entries:
        raise UsageError(f"pool '{root}' holds no images yet.")
    images = torch.stack([read_image(root / e["file"]) for e in entries])
    return Pool(
        root=root,
        images=images,
        labels=torch.tensor([e["label"] for e in entries]),
        kept_patches=torch.tensor([e["kept_patches"] for e in entries]),
        target_prob=torch.tensor([e["target_prob"] for e in entries]),
        run=run,
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

    def check(self) -> None:
        """Raise :class:`UsageError` if ``root`` holds something this run must not touch."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--out '{self.root}' exists and is not a folder.")
        existing = read_run(self.root) if self.root.is_dir() else None
        if existing is None:
            if self.root.is_dir() and any(self.root.iterdir()):
                raise UsageError(f"--out '{self.root}' is a non-empty folder that is not a sparseinv pool.")
            return
        if existing.get("model") != self.run["model"] or existing.get("settings") != self.run["settings"]:
            diff = sorted(
                k for k in set(existing.get("settings", {})) | set(self.run["settings"])
                if existing.get("settings", {}).get(k) != self.run["settings"].get(k)
            )
            what = "model" if existing.get("model") != self.run["model"] else ", ".join(diff)
            raise UsageError(f"--out '{self.root}' holds a pool made with different settings ({what}); choose another folder.")

    def open(self) -> int:
        """Create or reopen the folder; return how many images are already done."""
        self.check()
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        existing = read_run(self.root)
        if existing is not None:
            self.run["batches"] = existing.get("batches", [])
            self.entries = read_manifest(self.root)[: sum(b["size"] for b in self.run["batches"])]
            self.run.update(summarise_batches(self.run["batches"]))
        _atomic_write_json(self.root / "run.json", self.run)
        return len(self.entries)

    def add_batch(self, images: torch.Tensor, labels, kept_patches, target_prob, stats: dict) -> None:
        """Commit one batch: its PNGs, then its manifest lines and statistics."""
        start = len(self.entries)
        for offset, array in enumerate(to_uint8(images)):
            name = f"images/{start + offset:06d}.png"
            tmp = self.root / (name + ".tmp")
            Image.fromarray(array).save(tmp, format="PNG")
            os.replace(tmp, self.root / name)
            self.entries.append(
                {
                    "file": name,
                    "label": int(labels[offset]),
                    "kept_patches": [int(i) for i in kept_patches[offset]],
                    "target_prob": round(float(target_prob[offset]), 6),
                }
            )
        lines = "".join(json.dumps(e) + "\n" for e in self.entries)
        _atomic_write_bytes(self.root / "manifest.jsonl", lines.encode())
        self.run["batches"].append(stats)
        self.run.update(summarise_batches(self.run["batches"]))
        _atomic_write_json(self.root / "run.json", self.run)

    def finish(self, grid_png: bytes | None = None) -> dict:
        """Mark the pool complete and write its picture; return the run record."""
        self.run["complete"] = True
        if grid_png is not None:
            _atomic_write_bytes(self.root / "grid.png", grid_png)
        _atomic_write_json(self.root / "run.json", self.run)
        return self.run
