"""Commits of a pool run beside the inversion, and nothing of their guarantees is lost to that."""

from __future__ import annotations

import threading

import pytest
import torch

import sparseinv.pool as pool_module
from sparseinv.inversion.config import InversionConfig
from sparseinv.runs.inversion import run_record
from sparseinv.pool import PoolWriter, read_manifest


@pytest.fixture
def writer(tmp_path, tiny_vit):
    writer = PoolWriter(tmp_path / "pool", run_record(tiny_vit, InversionConfig(num_images=4, batch_size=2, iterations=2), "test_vit", None))
    writer.open()
    yield writer
    writer.close()


def _batch(index: int):
    images = torch.rand(2, 3, 160, 160)
    return index, images, torch.tensor([3, 4]), torch.arange(100).expand(2, -1), torch.tensor([0.5, 0.25]), {
        "size": 2, "wall_seconds": 1.0, "seconds_per_phase": [1.0], "tokens_per_phase": [100], "num_correct": 0, "final_seconds": 0.0}


def test_add_batch_returns_while_its_pngs_are_still_being_written(writer, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    real_save = pool_module.atomic_save

    def held_save(path, save):
        entered.set()
        assert gate.wait(30), "the test never opened the gate"
        return real_save(path, save)

    monkeypatch.setattr(pool_module, "atomic_save", held_save)
    writer.add_batch(*_batch(0))  # would wait forever here if the commit ran in this thread
    assert entered.wait(30)
    assert read_manifest(writer.root) == []  # nothing committed while its PNGs are held
    gate.set()
    writer.wait()
    entries = read_manifest(writer.root)
    assert [e["file"] for e in entries] == ["images/000000.png", "images/000001.png"] and [e["label"] for e in entries] == [3, 4]
    assert all((writer.root / e["file"]).is_file() for e in entries)


def test_a_failed_commit_is_raised_and_leaves_no_part(writer, monkeypatch):
    def broken_save(path, save):
        raise OSError("disk full")

    monkeypatch.setattr(pool_module, "atomic_save", broken_save)
    writer.add_batch(*_batch(0))
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    assert not list(writer.parts.glob("*.json")) and read_manifest(writer.root) == []


def test_close_finishes_the_commit_under_way(tmp_path, tiny_vit):
    writer = PoolWriter(tmp_path / "pool", run_record(tiny_vit, InversionConfig(num_images=4, batch_size=2, iterations=2), "test_vit", None))
    writer.open()
    writer.add_batch(*_batch(1))
    writer.close()  # as an interrupted run does: the batch already inverted is kept
    assert [e["file"] for e in read_manifest(tmp_path / "pool")] == ["images/000002.png", "images/000003.png"]
