"""Shared fixtures: offline hub, the real DeiT-Tiny from ../shared, tiny random ViTs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from sparseinv.models import load_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", ROOT.parent / "shared")).resolve()
DEIT_TINY_CKPT = SHARED / "assets" / "deit_tiny_patch16_224.safetensors"
TESTVECTORS = SHARED / "testvectors" / "smi_sparse_forward_deit_tiny.safetensors"
SYNSETS = SHARED / "assets" / "imagenet_synsets.txt"
VAL = SHARED / "data" / "imagenette" / "val"


@pytest.fixture(autouse=True)
def no_timing_probes(monkeypatch):
    """Tests never time the machine: a precision choice that reaches a timing probe fails the test.

    Tests inject the probes' answers instead (``Probes.fixed``, ``use_probes``, or by replacing
    ``bf16_speedup`` / ``fused_attention_slowdown``).
    """
    from sparseinv.inversion import precision

    def refuse(device, timer=None):
        pytest.fail("a test reached a timing probe of sparseinv.inversion.precision: inject its choice (Probes.fixed / use_probes)")

    monkeypatch.setattr(precision, "bf16_speedup", refuse)
    monkeypatch.setattr(precision, "fused_attention_slowdown", refuse)


def pytest_sessionstart(session):
    # CI must not pass by skipping: the real fixtures are required, so fail loudly.
    missing = [p for p in (DEIT_TINY_CKPT, TESTVECTORS, SYNSETS, VAL) if not p.exists()]
    if missing:
        raise pytest.UsageError(f"missing fixtures from ../shared: {', '.join(map(str, missing))}")


@pytest.fixture(scope="session")
def deit_tiny():
    torch.manual_seed(0)
    return load_model("deit_tiny_patch16_224", DEIT_TINY_CKPT)


@pytest.fixture(scope="session")
def tiny_vit():
    """timm's test_vit: 160 px, 16 px patches (10 x 10 grid), 6 blocks, random weights."""
    torch.manual_seed(0)
    return load_model("test_vit", pretrained=False)


def save_test_vit(path: Path, seed: int = 0) -> Path:
    """Random (seeded) test_vit weights written as a checkpoint file, for commands that take ``--checkpoint``."""
    from safetensors.torch import save_file

    from sparseinv.models import timm

    torch.manual_seed(seed)
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    return path


def random_kept_patches(num_keep: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For test_vit (10 x 10 patches of 16 px): random images, ``num_keep`` kept patches per
    image, and the pixel mask of the dropped ones, for 2 images."""
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 160, 160)
    keep = torch.stack([torch.randperm(100)[:num_keep].sort().values for _ in range(2)])
    dropped = torch.ones(2, 100, dtype=torch.bool)
    dropped[torch.arange(2)[:, None], keep] = False
    mask = dropped.view(2, 1, 10, 1, 10, 1).expand(2, 3, 10, 16, 10, 16).reshape(2, 3, 160, 160)
    return x, keep, mask


def interrupt_second_batch(monkeypatch) -> None:
    """Make inversion raise KeyboardInterrupt as its second batch starts (as Ctrl-C would there)."""
    import sparseinv.inversion.loop as loop

    real, calls = loop.invert_batch, []

    def invert_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "invert_batch", invert_batch)


def teacher_and_pool(root: Path) -> dict:
    """A random 5-class test_vit teacher saved under ``root`` and a 6-image sparse pool from it
    (stops at steps 2 and 4 of 6, 30% each: last-phase masks keep 49 of 100 patches)."""
    from safetensors.torch import save_file

    from sparseinv import InversionConfig, PruneSchedule, invert
    from sparseinv.models import timm

    torch.manual_seed(0)
    ckpt = root / "teacher.safetensors"
    save_file(timm.create_model("test_vit", num_classes=5).state_dict(), str(ckpt))
    teacher = load_model("test_vit", ckpt)
    invert(teacher, InversionConfig(num_images=6, batch_size=3, iterations=6, schedule=PruneSchedule((2, 4), (0.3, 0.3))),
           str(root / "pool"), model_name="test_vit", progress=False)
    return {"root": root, "ckpt": ckpt, "pool": root / "pool"}


def teacher_and_quantized(setup: dict):
    """:func:`teacher_and_pool`'s teacher and a W4/A4 ``recon`` copy of it (2 reconstruction steps) calibrated on the pool."""
    import copy
    from dataclasses import replace

    from sparseinv.quant import QuantConfig, pool_batches, quantize_

    teacher = load_model("test_vit", setup["ckpt"])
    q = copy.deepcopy(teacher)
    config = QuantConfig.for_method("recon", 4, 4)
    quantize_(q, replace(config, recon=replace(config.recon, iters=2)), pool_batches(q, str(setup["pool"]), "test_vit", num=6),
              progress=False)
    return teacher, q

