"""Real multi-process runs under torchrun (gloo, 2 CPU processes): the pool does not depend
on the number of processes, a killed rank loses only its batch in flight, and distributed
distillation trains the weights one process would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_test_vit

from sparseinv.cli import main
from sparseinv.distill import prepare_student
from sparseinv.models import load_model
from sparseinv.pool import read_pool

pytestmark = pytest.mark.slow

# 8 batches of 2 images, each long enough (~1 s here) that a kill lands mid-run.
INVERT = ["--num-images", "16", "--batch-size", "2", "--iterations", "150", "--prune-at", "50", "100",
          "--prune-ratio", "0.5", "0.5", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "sparseinv", *args]


def why(done: subprocess.CompletedProcess) -> str:
    """A failed run's stderr: its start (where a rank's own message is) and its end (torchrun's summary)."""
    text = done.stderr
    return text if len(text) < 6000 else f"{text[:3000]}\n...\n{text[-3000:]}"


def one_thread_main(argv: list[str]) -> int:
    """``main`` in this process with one thread, like each torchrun rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    ckpt = save_test_vit(root / "test_vit.safetensors")
    other = save_test_vit(root / "test_vit_other.safetensors", seed=1)  # a teacher the student differs from
    model = ["--model", "test_vit", "--checkpoint", str(ckpt)]
    assert one_thread_main(["invert", *model, *INVERT, "--out", str(root / "one")]) == 0
    return {"root": root, "ckpt": ckpt, "other": other, "model": model, "reference": root / "one"}


def assert_same_pool(a: Path, b: Path) -> None:
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    names = sorted(p.name for p in (a / "images").glob("*.png"))
    assert names == sorted(p.name for p in (b / "images").glob("*.png")) and len(names) == 16
    for name in names:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes(), name
    run = json.loads((b / "run.json").read_text())
    assert run["complete"] and [batch["index"] for batch in run["batches"]] == list(range(8))
    assert not (b / "parts").exists()
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()  # every image in the picture


def test_two_processes_make_the_pool_one_makes(setup):
    out = setup["root"] / "two"
    done = subprocess.run(torchrun(2, "invert", *setup["model"], *INVERT, "--out", str(out)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, why(done)
    assert "2 processes" in done.stdout
    assert_same_pool(setup["reference"], out)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and len(run["per_rank_seconds"]) == 2 and run["elapsed_seconds"] > 0
    assert [b["rank"] for b in run["batches"]] == [0, 1] * 4  # batch b on rank b mod 2


def test_two_processes_make_the_rebirth_pool_one_makes(setup):
    """Rebirth pools carry a per-patch detachment record in each manifest line; the ranks' parts must merge it intact."""
    rebirth = ["--schedule", "rebirth", "--num-images", "8", "--batch-size", "2", "--iterations", "40", "--quiet"]
    one, two = setup["root"] / "rebirth-one", setup["root"] / "rebirth-two"
    assert one_thread_main(["invert", *setup["model"], *rebirth, "--out", str(one)]) == 0
    done = subprocess.run(torchrun(2, "invert", *setup["model"], *rebirth, "--out", str(two)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, why(done)
    assert (one / "manifest.jsonl").read_bytes() == (two / "manifest.jsonl").read_bytes()
    for name in sorted(p.name for p in (one / "images").glob("*.png")):
        assert (one / "images" / name).read_bytes() == (two / "images" / name).read_bytes(), name
    a, b = read_pool(one), read_pool(two)
    assert len(b) == 8 and torch.equal(a.detached_at, b.detached_at)
    assert sorted(set(b.detached_at.flatten().tolist())) == [4, 8, 16, 40]  # three stops and the end: every group recorded


def test_a_killed_rank_loses_only_its_batch_and_any_process_count_finishes(setup):
    out = setup["root"] / "killed"
    # Rank 1 kills itself when its second batch (3) starts; torchrun then stops rank 0.
    killed = subprocess.run([*torchrun(2)[:-2], str(Path(__file__).with_name("torchrun_rank1_dies.py")), "invert", *setup["model"],
                             *INVERT, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0
    run = json.loads((out / "run.json").read_text())
    parts = list((out / "parts").glob("*.json"))
    done = {b["index"] for b in run["batches"]} | {int(p.stem) for p in parts}
    assert not run["complete"] and 1 in done and 3 not in done and len(done) < 8  # rank 1's first batch kept, its second lost

    # The same command finishes it with 2 processes, and a copy with 1.
    shutil.copytree(out, setup["root"] / "killed-one")
    kept = {name: (out / "images" / name).stat().st_mtime_ns for b in done for name in (f"{2 * b:06d}.png", f"{2 * b + 1:06d}.png")}
    again = subprocess.run(torchrun(2, "invert", *setup["model"], *INVERT, "--out", str(out)), env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, why(again)
    assert_same_pool(setup["reference"], out)
    assert {name: (out / "images" / name).stat().st_mtime_ns for name in kept} == kept  # nothing kept was made again
    assert one_thread_main(["invert", *setup["model"], *INVERT, "--out", str(setup["root"] / "killed-one")]) == 0
    assert_same_pool(setup["reference"], setup["root"] / "killed-one")


@pytest.mark.parametrize("mode", ["full", "linear-probe"])
def test_distributed_distillation_trains_the_weights_one_process_does(setup, mode):
    ckpt = setup["ckpt"]
    args = ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(setup['other']), "--student", "test_vit", "--student-checkpoint", str(ckpt), "--pool", str(setup["reference"]),
            "--mode", mode, "--epochs", "2", "--batch-size", "4", "--quiet", "--allow-other-weights",
            # a fresh head moves slowly at T = 20 (its gradient is the softmax difference over T)
            "--lr", "0.05" if mode == "full" else "0.5",
            # SGD: Adam's normalised step turns float-rounding noise in near-zero gradients into whole steps
            "--optimizer", "sgd"]
    one, two = setup["root"] / f"one-{mode}.safetensors", setup["root"] / f"two-{mode}.safetensors"
    assert one_thread_main([*args, "--out", str(one)]) == 0
    done = subprocess.run(torchrun(2, *args, "--out", str(two)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, why(done)
    a, b = load_file(str(one)), load_file(str(two))
    start = prepare_student(load_model("test_vit", ckpt), 1000, mode).state_dict()  # the head training starts from
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights...
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # ...and both runs moved them alike
    history = [json.loads(f.with_suffix(".json").read_text())["history"] for f in (one, two)]
    assert [h["loss"] for h in history[0]] == pytest.approx([h["loss"] for h in history[1]], rel=1e-3)


def test_single_process_commands_refuse_torchrun(setup, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", *setup["model"], "--data", "nowhere"]) == 2
    assert "runs as one process" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{not json", '{"index": 99, "entries": [], "stats": {"size": 0}}', '{"index": 1, "entries": [{"file": "images/000000.png"}], "stats": {"size": 1}}'])
def test_a_damaged_part_is_refused_in_one_line(setup, tmp_path, capsys, content):
    pool = tmp_path / "pool"
    shutil.copytree(setup["reference"], pool)
    run = json.loads((pool / "run.json").read_text())
    (pool / "run.json").write_text(json.dumps({**run, "complete": False, "batches": run["batches"][:1]}))
    (pool / "parts").mkdir()
    (pool / "parts" / "000001.json").write_text(content)
    assert main(["invert", *setup["model"], *INVERT, "--out", str(pool)]) == 2
    err = capsys.readouterr().err
    assert "pool part" in err and "delete it" in err and len(err.strip().splitlines()) == 1


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_distributed_rounds_grow_the_pool_one_process_grows_and_train_alike(setup):
    """--invert-every under torchrun: the round's images are the ones one process inverts, byte for byte, and the student trains alike.

    Plain rounds: a round aimed at the student depends on the student, which two processes train alike only
    to float rounding (checked below), so its images cannot match byte for byte."""
    args = ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(setup['ckpt']), "--student", "test_vit", "--student-checkpoint", str(setup['other']), "--pool", str(setup["reference"]),
            "--mode", "full", "--epochs", "2", "--batch-size", "4", "--invert-every", "1", "--num-images-per-round", "2",
            "--round-disagreement", "0", "--lr", "0.05", "--optimizer", "sgd", "--quiet"]
    one, two = setup["root"] / "rounds-one" / "s.safetensors", setup["root"] / "rounds-two" / "s.safetensors"
    assert one_thread_main([*args, "--out", str(one)]) == 0
    done = subprocess.run(torchrun(2, *args, "--out", str(two)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, why(done)
    grown = [f.parent / "s.rounds" / "round_001" for f in (one, two)]
    assert (grown[0] / "manifest.jsonl").read_bytes() == (grown[1] / "manifest.jsonl").read_bytes()
    images = sorted(p.name for p in (grown[0] / "images").glob("*.png"))
    assert len(images) == 2 and images == sorted(p.name for p in (grown[1] / "images").glob("*.png"))
    for name in images:
        assert (grown[0] / "images" / name).read_bytes() == (grown[1] / "images" / name).read_bytes(), name
    histories = [json.loads(f.with_suffix(".json").read_text())["history"] for f in (one, two)]
    assert [h["num_images"] for h in histories[0]] == [h["num_images"] for h in histories[1]] == [16, 18]
    a, b, start = load_file(str(one)), load_file(str(two)), load_file(str(setup["other"]))
    assert _max_difference(a, {k: start[k] for k in a}) > 1e-3  # training moved the weights...
    assert _max_difference(a, b) < 1e-5  # ...and both runs moved them alike


def test_distributed_quantization_aware_training_trains_the_step_sizes_one_process_does(setup):
    """distill --quantized under torchrun: the step sizes learned are one process's, the integer codes kept. The
    token-matching term is on (a quantized student's default): its normaliser is the whole batch's, not each process's."""
    quantized = setup["root"] / "qat-start.safetensors"
    assert one_thread_main(["quantize", *setup["model"], "--calib", str(setup["reference"]), "--w-bits", "4", "--a-bits", "8",
                            "--method", "calib", "--calib-num-images", "8", "--out", str(quantized), "--quiet"]) == 0
    args = ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(setup['ckpt']), "--quantized", str(quantized), "--pool", str(setup["reference"]),
            # One step of the whole pool: rounding makes QAT chaotic (a step size 1e-7 apart rounds some activation the
            # other way and the next gradient differs), so runs that differ only in summation order are compared after one.
            "--epochs", "1", "--batch-size", "16", "--warmup", "0", "--lr", "1e-3", "--optimizer", "sgd", "--quiet"]
    one, two = setup["root"] / "qat-one.safetensors", setup["root"] / "qat-two.safetensors"
    assert one_thread_main([*args, "--out", str(one)]) == 0
    done = subprocess.run(torchrun(2, *args, "--out", str(two)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, why(done)
    start, a, b = (load_file(str(f)) for f in (quantized, one, two))
    codes = [k for k in start if k.endswith(".w_int")]
    steps = [k for k in start if k.endswith((".scale", ".w_scale"))]
    assert codes and steps and all(torch.equal(a[k], start[k]) and torch.equal(b[k], start[k]) for k in codes)
    assert _max_difference({k: a[k] for k in steps}, {k: start[k] for k in steps}) > 1e-6  # the step sizes learned...
    moved = max(((a[k] - start[k]).abs() / start[k]).max().item() for k in steps)
    differ = max(((a[k] - b[k]).abs() / start[k]).max().item() for k in steps)
    assert differ < 1e-3 * moved, (differ, moved)  # ...alike in both runs
