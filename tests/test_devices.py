"""Every place that chooses a device, a dtype or a process group, reached on CPU with the choice forced.

No GPU is needed: CUDA's availability, device count and bf16 support are faked, and the
process-group start is recorded instead of made, so a wrong branch fails here.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist

from sparseinv import distributed
from sparseinv.cli.common import resolve_device
from sparseinv.errors import UsageError
from sparseinv.inversion import precision


def _args(device: str) -> argparse.Namespace:
    return argparse.Namespace(device=device, threads=None)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with two CUDA devices that support bf16, as far as sparseinv can tell."""
    calls = {"set_device": [], "init_process_group": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls["set_device"].append(index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls["init_process_group"].append(backend))
    return calls


def test_cuda_is_refused_where_torch_sees_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device(_args("cuda"))
    for bad, message in (("gpu", "unknown device"), ("meta", "unsupported device")):
        with pytest.raises(UsageError, match=message):
            resolve_device(_args(bad))


def test_one_process_uses_the_device_it_is_given(fake_cuda):
    assert resolve_device(_args("cpu")) == torch.device("cpu")
    assert resolve_device(_args("cuda")) == torch.device("cuda")
    assert resolve_device(_args("cuda:1")) == torch.device("cuda", 1)


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(fake_cuda, monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: distributed.Dist(rank=3, world_size=4, local_rank=1))
    assert resolve_device(_args("cuda")) == torch.device("cuda", 1)
    assert resolve_device(_args("cuda:0")) == torch.device("cuda", 0)  # an explicit index is the user's choice
    assert resolve_device(_args("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("device_type, local_rank, backend, gpu", [("cuda", "1", "nccl", 1), ("cpu", "1", "gloo", None)])
def test_the_process_group_is_nccl_on_cuda_and_gloo_on_cpu(fake_cuda, monkeypatch, device_type, local_rank, backend, gpu):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    distributed.init_from_env(device_type)
    assert fake_cuda["init_process_group"] == [backend]
    assert fake_cuda["set_device"] == ([] if gpu is None else [gpu])


def test_more_processes_than_gpus_is_refused_before_the_group_starts(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")  # a third process on a two-GPU machine
    with pytest.raises(UsageError, match="no GPU of its own"):
        distributed.init_from_env("cuda")
    assert fake_cuda["init_process_group"] == []


@pytest.mark.parametrize("supported, asked, used", [(True, "auto", "bf16"), (False, "auto", "fp32"), (True, "bf16", "bf16"),
                                                    (True, "fp32", "fp32"), (False, "fp32", "fp32")])
def test_cuda_precision_follows_the_devices_bf16_support(monkeypatch, supported, asked, used):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: pytest.fail("no CPU probe for a CUDA device"))
    assert precision._resolve_dtype(asked, torch.device("cuda")).used == used


def test_bf16_on_a_cuda_device_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UsageError, match="does not support bf16"):
        precision._resolve_dtype("bf16", torch.device("cuda"))


@pytest.mark.parametrize("speedup, used", [(2.0, "bf16"), (1.1, "fp32")])
def test_auto_on_a_cpu_follows_the_probe(monkeypatch, speedup, used):
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: speedup)
    assert precision._resolve_dtype("auto", torch.device("cpu")).used == used
