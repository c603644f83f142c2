"""--precision: bf16 autocast for the model only, chosen by a probe under ``auto``, recorded in run.json."""

from __future__ import annotations

import json

import pytest
import torch

from sparseinv import InversionConfig, PruneSchedule, UsageError, invert, read_pool
from sparseinv.inversion import precision as precision_module
from sparseinv.inversion.precision import resolve_precision

SPARSE = PruneSchedule((2, 4), (0.5, 0.5))


def _config(precision: str) -> InversionConfig:
    return InversionConfig(num_images=2, batch_size=2, iterations=6, schedule=SPARSE, seed=3, precision=precision)


def test_bf16_inversion_writes_a_valid_pool_and_records_its_precision(tmp_path, tiny_vit):
    invert(tiny_vit, _config("bf16"), str(tmp_path / "pool"), model_name="test_vit", progress=False)
    pool = read_pool(tmp_path / "pool")  # every invariant of a pool is checked on reading
    assert torch.isfinite(pool.images).all() and pool.images.min() >= 0 and pool.images.max() <= 1
    assert pool.kept_patches.shape == (2, 25)
    run = json.loads((tmp_path / "pool" / "run.json").read_text())
    assert run["precision"]["used"] == "bf16" and run["settings"]["precision"] == "bf16"


def test_bf16_really_changes_the_arithmetic(tiny_vit):
    fp32 = invert(tiny_vit, _config("fp32"), progress=False)
    bf16 = invert(tiny_vit, _config("bf16"), progress=False)
    assert not torch.equal(fp32.images, bf16.images)  # autocast took effect
    assert fp32.run["precision"]["used"] == "fp32"


@pytest.mark.parametrize("speedup, used", [(1.0, "fp32"), (1.19, "fp32"), (3.0, "bf16")])
def test_auto_uses_bf16_only_where_the_probe_finds_it_faster(monkeypatch, speedup, used):
    monkeypatch.setattr(precision_module, "bf16_speedup", lambda device: speedup)
    chosen = resolve_precision("auto", torch.device("cpu"))
    assert chosen.used == used and chosen.asked == "auto" and "on this CPU" in chosen.why


def test_fp32_is_left_out_of_the_settings_so_older_pools_continue():
    assert "precision" not in InversionConfig().record()
    assert InversionConfig(precision="auto").record()["precision"] == "auto"
    with pytest.raises(UsageError, match="unknown precision 'fp16'"):
        InversionConfig(precision="fp16").validate()


def test_probe_measures_this_machine_once(monkeypatch):
    precision_module._probe_cache.clear()
    first = precision_module.bf16_speedup(torch.device("cpu"))
    assert first > 0 and precision_module.bf16_speedup(torch.device("cpu")) == first


@pytest.mark.parametrize("slowdown, explicit", [(3.0, True), (1.0, False)])
def test_bf16_runs_attention_explicitly_where_the_probe_finds_fused_slower(monkeypatch, tiny_vit, slowdown, explicit):
    monkeypatch.setattr(precision_module, "fused_attention_slowdown", lambda device: slowdown)
    seen = []
    attn = tiny_vit.blocks[0].attn
    handle = attn.register_forward_hook(lambda module, inputs, output: seen.append(module.fused_attn))
    try:
        result = invert(tiny_vit, _config("bf16"), progress=False)
    finally:
        handle.remove()
    assert seen and all(fused is not explicit for fused in seen)
    assert attn.fused_attn  # restored after the run
    assert result.run["precision"]["attention"] == ("explicit" if explicit else "as the model sets it")


def test_fp32_leaves_attention_as_the_model_sets_it(monkeypatch):
    monkeypatch.setattr(precision_module, "fused_attention_slowdown", lambda device: 10.0)
    assert resolve_precision("fp32", torch.device("cpu")).fused_attention
    assert not resolve_precision("bf16", torch.device("cpu")).fused_attention
