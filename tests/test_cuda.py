"""Every command with ``--device cuda``, end to end, on tiny models.

Runs where torch sees a GPU and is skipped, visibly (``-ra`` lists the reason), where
it does not. ``SPARSEINV_TEST_DEVICE=cpu`` runs the same chain on the CPU, which checks
the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from conftest import SHARED, save_test_vit
from sparseinv.cli import main
from sparseinv.inversion.precision import Probes, use_probes

DEVICE = os.environ.get("SPARSEINV_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="no CUDA device: the --device cuda command checks did not run"),
]
METHODS = ("psaq", "calib", "repq", "recon")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A test_vit checkpoint, a sparse pool inverted on the device, and a small labelled folder."""
    root = tmp_path_factory.mktemp("cuda")
    ckpt = save_test_vit(root / "vit.safetensors")
    model = ["--model", "test_vit", "--checkpoint", str(ckpt)]
    pool = root / "pool"
    assert main(["invert", *model, "--num-images", "4", "--batch-size", "2", "--iterations", "8", "--out", str(pool),
                 "--device", DEVICE, "--quiet"]) == 0
    data = root / "images"
    for i, name in enumerate(("n01440764", "n01443537")):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (160, 160), (60 * i, 90, 200)).save(data / name / "0.png")
    return {"root": root, "ckpt": ckpt, "model": model, "pool": pool, "data": data}


def test_invert_on_the_device_writes_a_whole_pool(chain):
    run = json.loads((chain["pool"] / "run.json").read_text())
    assert run["complete"] and run["num_images"] == 4 and run["device"].startswith(DEVICE)


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_invert_in_other_precisions(chain, precision):
    out = chain["root"] / f"pool-{precision}"
    with use_probes(Probes.fixed(bf16_speedup=2.0)):  # tests never time the machine
        assert main(["invert", *chain["model"], "--num-images", "2", "--iterations", "6", "--precision", precision,
                     "--out", str(out), "--device", DEVICE, "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["precision"]["used"] == "bf16"


@pytest.mark.parametrize("method", METHODS)
def test_quantize_evaluate_and_export_a_file_quantized_on_the_device(chain, method, capsys):
    q = chain["root"] / f"{method}.safetensors"
    recon = ["--recon-iters", "2"] if method == "recon" else []
    assert main(["quantize", *chain["model"], "--calib", str(chain["pool"]), "--method", method, "--w-bits", "8", "--a-bits", "8",
                 *recon, "--out", str(q), "--device", DEVICE, "--quiet"]) == 0
    assert main(["evaluate", *chain["model"], "--quantized", str(q), "--data", str(chain["data"]), "--device", DEVICE, "--quiet"]) == 0
    if method != "psaq":  # the psaq scheme has no integer form (refused, as on the CPU)
        onnx = chain["root"] / f"{method}.onnx"
        assert main(["export", *chain["model"], "--quantized", str(q), "--out", str(onnx), "--quiet"]) == 0
        assert main(["evaluate", *chain["model"], "--onnx", str(onnx), "--data", str(chain["data"]), "--quiet"]) == 0


cuda_only = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs exist on CUDA devices only")


@cuda_only
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_make_the_eager_loops_images(chain, precision):
    from sparseinv import InversionConfig, PruneSchedule, load_model
    from sparseinv.inversion.loop import invert_batch

    model = load_model("test_vit", chain["ckpt"], device=DEVICE)
    # Five phases, each long enough to be captured; a colour shift adds a draw per step.
    config = InversionConfig(num_images=4, batch_size=4, iterations=40, schedule=PruneSchedule((6, 12, 18, 24), (0.3,) * 4),
                             color_shift=0.3, precision=precision)
    labels = torch.tensor([1, 2, 3, 4], device=DEVICE)
    eager = invert_batch(model, labels, config, seed=3, progress=False)
    again = invert_batch(model, labels, config, seed=3, progress=False)
    graphed = invert_batch(model, labels, config, seed=3, progress=False, cuda_graphs=True)
    # The same draws: only float rounding (and the GPU's own run-to-run order of atomic sums) parts them.
    noise = (again.images - eager.images).abs().mean().item()
    apart = (graphed.images - eager.images).abs().mean().item()
    assert apart <= max(4 * noise, 2 / 255), (apart, noise)
    assert (graphed.kept_patches == eager.kept_patches).float().mean() >= 0.9


@cuda_only
def test_invert_with_cuda_graphs(chain):
    out = chain["root"] / "pool-graphs"
    assert main(["invert", *chain["model"], "--num-images", "2", "--iterations", "40", "--out", str(out), "--device", DEVICE,
                 "--cuda-graphs", "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] and run["cuda_graphs"] is True


def test_evaluate_the_model_itself(chain):
    assert main(["evaluate", *chain["model"], "--data", str(chain["data"]), "--device", DEVICE, "--quiet"]) == 0


@pytest.mark.parametrize("student", [
    ["--depth", "3"],
    ["--blocks", "0", "2", "4"],
    ["--student", "test_vit", "--student-random-weights", "--mode", "linear-probe"],
    ["--depth", "3", "--invert-every", "1", "--num-images-per-round", "2"],
], ids=["depth", "blocks", "student", "invert-every"])
def test_distill_every_student_kind(chain, student):
    teacher = ["test_vit", "--teacher-checkpoint", str(chain["ckpt"])]
    out = chain["root"] / f"student-{student[0].strip('-')}-{len(student)}.safetensors"
    assert main(["distill", "--teacher", *teacher, *student, "--pool", str(chain["pool"]), "--epochs", "1", "--batch-size", "2",
                 "--out", str(out), "--device", DEVICE, "--quiet"]) == 0
    assert out.is_file()


def test_distill_a_quantized_student(chain):
    q = chain["root"] / "w4a8.safetensors"
    assert main(["quantize", *chain["model"], "--calib", str(chain["pool"]), "--w-bits", "4", "--a-bits", "8", "--recon-iters", "2",
                 "--out", str(q), "--device", DEVICE, "--quiet"]) == 0
    out = chain["root"] / "qat.safetensors"
    assert main(["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(chain['ckpt']), "--quantized", str(q), "--pool", str(chain["pool"]),
                 "--epochs", "1", "--batch-size", "2", "--out", str(out), "--device", DEVICE, "--quiet"]) == 0
    assert main(["evaluate", *chain["model"], "--quantized", str(out), "--data", str(chain["data"]), "--device", DEVICE, "--quiet"]) == 0


def test_demo_quick(tmp_path):
    assert main(["demo", "--shared", str(SHARED), "--quick", "--out", str(tmp_path / "demo"), "--device", DEVICE, "--quiet"]) == 0


@pytest.mark.skipif(DEVICE.startswith("cuda") and torch.cuda.device_count() < 2,
                    reason="fewer than 2 GPUs: the torchrun (nccl) check did not run")
def test_torchrun_on_two_devices(chain, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pool"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sparseinv", "invert",
               *chain["model"], "--num-images", "4", "--batch-size", "1", "--iterations", "6", "--out", str(out), "--device", DEVICE,
               "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[:2000]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
