"""Patch Rebirth Inversion (``--schedule rebirth``): detachment, the pool it writes, resume, and the commands downstream."""

from __future__ import annotations

import json

import pytest
import torch

import sparseinv.inversion.loop as inversion
from conftest import interrupt_second_batch, save_test_vit
from sparseinv import InversionConfig, PruneSchedule, UsageError, invert, invert_batch, read_pool, sparse_forward, vit_info
from sparseinv.cli import main
from sparseinv.inversion.kept_pixels import KeptPixels

REBIRTH = PruneSchedule(steps=(3, 6), ratios=(0.3, 0.3))  # 100 optimised -> 70 -> 40; 30 detached at 3, 30 at 6, 40 at the end
ITERATIONS = 10


def _config(**overrides) -> InversionConfig:
    base = dict(num_images=4, batch_size=2, iterations=ITERATIONS, schedule=REBIRTH, strategy="rebirth", seed=3)
    return InversionConfig(**{**base, **overrides})


def _per_patch(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, 160, 160) -> (B, 100, 3 * 16 * 16): each patch's pixels, row-major."""
    return image.unflatten(2, (10, 16)).unflatten(4, (10, 16)).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)


@pytest.fixture
def canvases(monkeypatch):
    """The whole image after every step's update (the canvas KeptPixels writes the optimised patches into)."""
    seen: list[torch.Tensor] = []
    real = KeptPixels.write

    def write(self, kept):
        real(self, kept)
        seen.append(self.canvas.detach().clone())

    monkeypatch.setattr(KeptPixels, "write", write)
    return seen


def test_detached_patches_never_change_after_their_stop_while_the_rest_do(tiny_vit, canvases):
    result = invert_batch(tiny_vit, torch.tensor([1, 2]), _config(), seed=0, progress=False)
    assert len(canvases) == ITERATIONS
    steps = result.detached_at
    assert steps.shape == (2, 100)
    for stop, count in ((3, 30), (6, 30), (ITERATIONS, 40)):
        assert ((steps == stop).sum(1) == count).all(), stop
    patches = torch.stack([_per_patch(c) for c in canvases])  # (steps, B, 100, pixels); canvases[s] is after step s
    for s in range(1, ITERATIONS):
        moved = (patches[s] - patches[s - 1]).abs().amax(-1) > 0  # (B, 100)
        optimised = steps > s  # step s optimised the patches not yet detached at its start
        assert torch.equal(moved, optimised), s
    # The output holds every patch: the detached ones as they were at their stop, 8-bit rounded.
    info = vit_info(tiny_vit)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (info.mean, info.std))
    for stop in (3, 6):
        frozen = _per_patch(((canvases[stop - 1] * std + mean).clamp(0, 1) * 255).round() / 255)
        out = _per_patch(result.images)
        mask = steps == stop
        assert torch.allclose(out[mask], frozen[mask], atol=1e-6), stop
    assert torch.equal(result.kept_patches, torch.arange(100).expand(2, -1))  # every patch is fed downstream


def test_the_detached_patches_are_the_most_attended_and_leave_the_token_sequence(tiny_vit, canvases):
    lengths: list[int] = []
    hook = tiny_vit.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    try:
        result = invert_batch(tiny_vit, torch.tensor([4, 5]), _config(), seed=1, progress=False)
    finally:
        hook.remove()
    # Steps feed 1 + 100, 70, 40 tokens; the second stop scores the 70, the end two dense passes.
    assert lengths.count(41) == ITERATIONS - 6 and lengths.count(71) == 3 + 1
    assert result.tokens_per_phase == [100, 70, 40]
    with torch.no_grad():
        attn = sparse_forward(tiny_vit, canvases[2], None, return_cls_attn=True).cls_attn  # what the first stop scored
    first = attn.topk(30, dim=1).indices.sort(1).values
    assert torch.equal(first, torch.nonzero(result.detached_at == 3)[:, 1].view(2, 30))


def test_rebirth_settings_are_recorded_and_older_records_mean_stop(tmp_path):
    config = _config()
    assert config.record()["strategy"] == "rebirth"
    assert InversionConfig.from_record(config.record()) == config
    plain = InversionConfig(schedule=PruneSchedule.reference())
    assert "strategy" not in plain.record()  # pools made before the option keep their record, and resume
    assert InversionConfig.from_record(plain.record()).strategy == "stop"
    assert PruneSchedule.rebirth(400) == PruneSchedule((40, 80, 160), (0.25, 0.25, 0.25))
    assert PruneSchedule.rebirth(400).keep_counts(196, "rebirth") == [196, 147, 98, 49]
    for bad, message in ((PruneSchedule(), "needs stop steps"), (PruneSchedule((2, 4), (0.5, 0.5)), "sum below 1")):
        with pytest.raises(UsageError, match=message):
            _config(schedule=bad).validate()
    with pytest.raises(UsageError, match="unknown strategy"):
        _config(strategy="grow").validate()


def test_a_rebirth_pool_records_detachments_and_resumes_to_the_same_images(tiny_vit, tmp_path, monkeypatch):
    config = _config(num_images=4, batch_size=2)
    whole = invert(tiny_vit, config, str(tmp_path / "whole"), model_name="test_vit", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "manifest.jsonl").read_text().splitlines()]
    assert all(len(line["detached_at"]) == 100 and len(line["kept_patches"]) == 100 for line in lines)
    pool = read_pool(tmp_path / "whole")
    assert torch.equal(pool.detached_at, whole.detached_at) and not pool.is_sparse

    interrupt_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        invert(tiny_vit, config, str(tmp_path / "cut"), model_name="test_vit", progress=False)
    monkeypatch.undo()
    assert len(read_pool(tmp_path / "cut")) == 2
    with pytest.raises(UsageError, match="different settings"):  # a sparse run may not continue a rebirth pool
        invert(tiny_vit, _config(num_images=4, batch_size=2, strategy="stop"), str(tmp_path / "cut"), model_name="test_vit", progress=False)
    invert(tiny_vit, config, str(tmp_path / "cut"), model_name="test_vit", progress=False)
    cut = read_pool(tmp_path / "cut")
    assert torch.equal(cut.images, pool.images) and torch.equal(cut.detached_at, pool.detached_at)


def test_a_damaged_detachment_record_is_refused(tiny_vit, tmp_path):
    invert(tiny_vit, _config(num_images=2, batch_size=2), str(tmp_path / "p"), model_name="test_vit", progress=False)
    manifest = tmp_path / "p" / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[1]["detached_at"] = lines[1]["detached_at"][:-1]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(UsageError, match="detached_at"):
        read_pool(tmp_path / "p")


def test_cli_rebirth_pool_feeds_quantize_distill_and_evaluate(tmp_path, capsys):
    ckpt = str(save_test_vit(tmp_path / "vit.safetensors"))
    model = ["--model", "test_vit", "--checkpoint", ckpt]
    pool = tmp_path / "pool"
    assert main(["invert", *model, "--schedule", "rebirth", "--iterations", "8", "--num-images", "4", "--batch-size", "2",
                 "--out", str(pool), "--quiet"]) == 0
    assert "rebirth inversion" in capsys.readouterr().out
    settings = json.loads((pool / "run.json").read_text())["settings"]
    assert settings["strategy"] == "rebirth"
    assert settings["schedule"] == {"steps": [1, 2, 3], "ratios": [0.25] * 3}  # 400/800/1600 of 4000, at 8 steps
    assert sorted(set(read_pool(pool).detached_at.flatten().tolist())) == [1, 2, 3, 8]
    q = tmp_path / "q.safetensors"
    assert main(["quantize", *model, "--calib", str(pool), "--w-bits", "4", "--a-bits", "8", "--recon-iters", "2",
                 "--calib-num-images", "4", "--out", str(q), "--quiet"]) == 0
    student = tmp_path / "student.safetensors"
    assert main(["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(ckpt), "--depth", "3", "--pool", str(pool), "--epochs", "1",
                 "--batch-size", "2", "--out", str(student), "--quiet"]) == 0
    assert student.is_file()
    assert main(["invert", *model, "--schedule", "rebirth", "--iterations", "3", "--out", str(tmp_path / "short"), "--quiet"]) == 2
    assert "too short for the rebirth schedule" in capsys.readouterr().err


def test_a_rebirth_step_reads_nothing_back_to_the_host(tiny_vit):
    from test_host_syncs import HostReads

    def reads(iterations: int):
        schedule = PruneSchedule(tuple(iterations * k // 8 for k in (1, 2, 4)), (0.25,) * 3)
        with HostReads() as mode:
            invert_batch(tiny_vit, torch.tensor([1, 2]), _config(iterations=iterations, schedule=schedule), seed=0, progress=True)
        return mode.counts

    short, long = reads(16), reads(48)
    per_step = {op: (long[op] - short[op]) / 32 for op in long | short}
    assert sum(per_step.values()) <= 0.1, per_step
