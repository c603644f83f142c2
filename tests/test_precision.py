"""--precision: bf16 autocast for the model only, chosen by a probe under ``auto``, recorded in run.json.

No test here times anything (conftest fails any test that reaches a timing probe): the
probes' answers are injected with ``Probes.fixed`` and ``use_probes``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from sparseinv import InversionConfig, PruneSchedule, UsageError, invert, read_pool
from sparseinv.inversion import precision as precision_module
from sparseinv.inversion.precision import PROBE_MARGIN, Probes, resolve_precision, use_probes

# The real probes, kept before conftest replaces them for each test.
REAL_BF16_SPEEDUP, REAL_ATTENTION_SLOWDOWN = precision_module.bf16_speedup, precision_module.fused_attention_slowdown

SPARSE = PruneSchedule((2, 4), (0.5, 0.5))


def _config(precision: str) -> InversionConfig:
    return InversionConfig(num_images=2, batch_size=2, iterations=6, schedule=SPARSE, seed=3, precision=precision)


def test_bf16_inversion_writes_a_valid_pool_and_records_its_precision(tmp_path, tiny_vit):
    with use_probes(Probes.fixed(bf16_speedup=1.0, fused_attention_slowdown=1.0)):
        invert(tiny_vit, _config("bf16"), str(tmp_path / "pool"), model_name="test_vit", progress=False)
    pool = read_pool(tmp_path / "pool")  # every invariant of a pool is checked on reading
    assert torch.isfinite(pool.images).all() and pool.images.min() >= 0 and pool.images.max() <= 1
    assert pool.kept_patches.shape == (2, 25)
    run = json.loads((tmp_path / "pool" / "run.json").read_text())
    assert run["precision"]["used"] == "bf16" and run["settings"]["precision"] == "bf16"


def test_bf16_really_changes_the_arithmetic(tiny_vit):
    """bf16 runs the model's matrix products in bf16 and lands near the fp32 images of the same seed."""
    dtypes = []
    handle = tiny_vit.blocks[0].mlp.fc1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    try:
        with use_probes(Probes.fixed(bf16_speedup=1.0, fused_attention_slowdown=1.0)):
            fp32 = invert(tiny_vit, _config("fp32"), progress=False)
            fp32_dtypes = set(dtypes)
            dtypes.clear()
            bf16 = invert(tiny_vit, _config("bf16"), progress=False)
            other_seed = invert(tiny_vit, replace(_config("fp32"), seed=4), progress=False)
    finally:
        handle.remove()
    assert fp32_dtypes == {torch.float32} and torch.bfloat16 in dtypes  # autocast took effect, for bf16 only
    assert fp32.run["precision"]["used"] == "fp32" and bf16.run["precision"]["used"] == "bf16"
    assert not torch.equal(fp32.images, bf16.images)
    # Same seed, other arithmetic: the images move far less than another seed moves them.
    assert (bf16.images - fp32.images).abs().mean() < 0.5 * (other_seed.images - fp32.images).abs().mean()


@pytest.mark.parametrize("speedup, used", [(1.0, "fp32"), (1.19, "fp32"), (PROBE_MARGIN, "bf16"), (3.0, "bf16")])
def test_auto_uses_bf16_only_where_the_probe_finds_it_faster(speedup, used):
    chosen = resolve_precision("auto", torch.device("cpu"), Probes.fixed(speedup))
    assert chosen.used == used and chosen.asked == "auto" and "on this CPU" in chosen.why
    with use_probes(Probes.fixed(speedup)):  # the same choice where the caller cannot pass probes (invert)
        assert resolve_precision("auto", torch.device("cpu")) == chosen


def test_fp32_is_left_out_of_the_settings_so_older_pools_continue():
    assert "precision" not in InversionConfig().record()
    assert InversionConfig(precision="auto").record()["precision"] == "auto"
    with pytest.raises(UsageError, match="unknown precision 'fp16'"):
        InversionConfig(precision="fp16").validate()


@pytest.mark.parametrize("probe, cache", [(REAL_BF16_SPEEDUP, precision_module._probe_cache),
                                          (REAL_ATTENTION_SLOWDOWN, precision_module._attention_cache)])
def test_probes_time_through_their_timer_once_per_device(monkeypatch, probe, cache):
    """Each probe is a ratio of two timings, taken once per process and device (a stand-in timer: nothing is timed)."""
    monkeypatch.setattr(precision_module, "wall_seconds", lambda *a, **k: pytest.fail("the real timer ran"))
    monkeypatch.setitem(cache, "cpu", None)
    del cache["cpu"]
    times = iter([3.0, 1.5])
    calls = []

    def timer(fn, device, warmup, repeats):
        calls.append((device.type, warmup, repeats))
        return next(times)

    assert probe(torch.device("cpu"), timer) == 2.0  # the first timing over the second
    assert probe(torch.device("cpu"), timer) == 2.0 and len(calls) == 2  # cached: not timed again


@pytest.mark.parametrize("slowdown, explicit", [(3.0, True), (1.0, False)])
def test_bf16_runs_attention_explicitly_where_the_probe_finds_fused_slower(tiny_vit, slowdown, explicit):
    seen = []
    attn = tiny_vit.blocks[0].attn
    handle = attn.register_forward_hook(lambda module, inputs, output: seen.append(module.fused_attn))
    try:
        with use_probes(Probes.fixed(bf16_speedup=1.0, fused_attention_slowdown=slowdown)):
            result = invert(tiny_vit, _config("bf16"), progress=False)
    finally:
        handle.remove()
    assert seen and all(fused is not explicit for fused in seen)
    assert attn.fused_attn  # restored after the run
    assert result.run["precision"]["attention"] == ("explicit" if explicit else "as the model sets it")


def test_fp32_leaves_attention_as_the_model_sets_it():
    probes = Probes.fixed(bf16_speedup=1.0, fused_attention_slowdown=10.0)
    assert resolve_precision("fp32", torch.device("cpu"), probes).fused_attention
    assert not resolve_precision("bf16", torch.device("cpu"), probes).fused_attention


def test_replaced_probes_are_still_the_ones_used(monkeypatch):
    """Without injected probes the module's probe functions answer, looked up when called (benchmarks replace them)."""
    monkeypatch.setattr(precision_module, "bf16_speedup", lambda device: 5.0)
    monkeypatch.setattr(precision_module, "fused_attention_slowdown", lambda device: 5.0)
    chosen = resolve_precision("auto", torch.device("cpu"))
    assert chosen.used == "bf16" and not chosen.fused_attention
