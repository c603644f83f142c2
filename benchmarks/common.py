"""Paths, cached pools and result files shared by the benchmark scripts.

Benchmarks import the package and write ``benchmarks/results/*.json``; they are not
tests. Pools and checkpoints they make are cached under ``benchmarks/cache/``
(gitignored) and reused on the next run: ``sparseinv.invert`` continues or reuses a
pool folder with the same settings.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from sparseinv import InversionConfig, PruneSchedule, invert, load_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", ROOT.parent / "shared")).resolve()
DEIT_TINY = "deit_tiny_patch16_224"
DEIT_TINY_CKPT = SHARED / "assets" / "deit_tiny_patch16_224.safetensors"
SYNSETS = SHARED / "assets" / "imagenet_synsets.txt"
VAL = SHARED / "data" / "imagenette" / "val"
TRAIN100 = SHARED / "data" / "imagenette" / "train100"
CACHE = ROOT / "benchmarks" / "cache"
RESULTS = ROOT / "benchmarks" / "results"

# The scaled-down inversion protocol the accuracy benchmarks share: the reference
# stop steps and ratios, but 400 iterations instead of 4000 (a dense 4000-step batch
# of 32 is over an hour on this CPU). The published SMI pipeline has also been measured
# at this same length.
POOL_ITERATIONS = 400


def scaled_schedule(iterations: int) -> PruneSchedule:
    """The reference stop steps scaled by ``iterations / 4000``, so each phase keeps its share of the run."""
    return PruneSchedule.reference(iterations)


def pool_config(sparse: bool, num_images: int = 32, batch_size: int = 32, iterations: int = POOL_ITERATIONS,
                seed: int = 0, classes: tuple[int, ...] | None = None) -> InversionConfig:
    return InversionConfig(
        num_images=num_images,
        batch_size=batch_size,
        iterations=iterations,
        schedule=PruneSchedule.reference() if sparse else PruneSchedule(),
        classes=classes,
        seed=seed,
        final_mask="rescore",  # the rule the cached pools and the README's tables were made with
    )


def ensure_pool(name: str, model_name: str, checkpoint: Path | None, config: InversionConfig, model=None) -> Path:
    """Invert into ``benchmarks/cache/pools/<name>`` unless that pool is already complete."""
    out = CACHE / "pools" / name
    run_file = out / "run.json"
    if run_file.is_file():
        record = json.loads(run_file.read_text())
        # A cached pool is reused only if it was made as asked: its recorded settings, or (a record
        # older than some field) those from_record fills in, must be this config's. from_record
        # cannot rebuild extra loss terms; those records must match as written.
        recorded, wanted = record["settings"], json.loads(json.dumps(config.record()))
        if recorded != wanted and not recorded.get("loss", {}).get("extra"):
            recorded = json.loads(json.dumps(InversionConfig.from_record(recorded).record()))
        if recorded != wanted:
            differ = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
            raise SystemExit(f"cached pool {out} was made with other settings ({', '.join(differ)}): delete it or rename the benchmark's pool")
        if record.get("complete"):
            return out
    if model is None:
        model = load_model(model_name, checkpoint)
    invert(model, config, str(out), model_name=model_name, checkpoint=None if checkpoint is None else str(checkpoint))
    return out


def machine(device: torch.device | None = None) -> dict:
    """What the numbers were measured on (with the GPU's name when ``device`` is one)."""
    out = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
    }
    if device is not None and device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return out


def commit() -> str:
    """The checkout's commit, recorded with every result."""
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def write_results(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the command and machine stamped in."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"command": "python " + " ".join(sys.argv), "machine": machine(), "commit": commit(), **payload}  # the payload's own machine wins
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def image_subset(model, root: Path, per_class: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class of ``root``, eval-transformed for ``model``,
    cached on disk as ``imagenette_<name>_first<per_class>.pt``."""
    from sparseinv.data import ImageFolder, read_class_index, transform_folder

    path = CACHE / f"imagenette_{name}_first{per_class}.pt"
    if path.is_file():
        cached = torch.load(path)
        return cached["images"], cached["labels"]
    folder = ImageFolder.scan(root, read_class_index(SYNSETS), limit_per_class=per_class)
    images, labels = transform_folder(folder, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": images, "labels": labels}, path)
    return images, labels
