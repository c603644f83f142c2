"""Every `sparseinv` command in the README runs as written, on test_vit with tiny sizes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_test_vit
from sparseinv.cli import main

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
# Covered elsewhere, by design: a user's own file (tests/test_model_loading.py builds one) and a
# hub download (this machine is offline; the offline message is tested there too).
NOT_RUN = ("my_finetuned_37_classes.pth", "hf-hub:")
# The README's sizes are for DeiT-Tiny on real weights; the same commands on test_vit, small.
SMALLER = {"deit_tiny_patch16_224": "test_vit", "--num-images 32": "--num-images 2", "--iterations 400": "--iterations 8",
           "--epochs 25": "--epochs 1", "--batch-size 32": "--batch-size 2"}


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(("sparseinv ", ".venv/bin/sparseinv ")):
                commands.append(" ".join(line.removeprefix(".venv/bin/").split()))
    return commands


def test_the_readme_has_the_four_jobs():
    commands = " | ".join(readme_commands())
    for job in ("sparseinv invert", "sparseinv quantize", "sparseinv export", "sparseinv distill", "--onnx", "--depth", "--quantized"):
        assert job in commands, job


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = save_test_vit(tmp_path / "test_vit.safetensors")
    val = tmp_path / "val"
    rng = np.random.default_rng(0)
    for synset in ("n01440764", "n01443537"):  # ImageNet synset folders, as Imagenette's are
        (val / synset).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (170, 170, 3), dtype=np.uint8)).save(val / synset / "0.png")
    ran = 0
    for command in readme_commands():
        if any(marker in command for marker in NOT_RUN):
            continue
        for big, small in SMALLER.items():
            command = command.replace(big, small)
        command = command.replace("$CKPT", str(ckpt)).replace("../shared/data/imagenette/val", str(val))
        assert main(shlex.split(command)[1:]) == 0, command
        ran += 1
    assert ran >= 10


def test_the_readme_gpu_install_builds_on_the_environments_torch():
    """The README's GPU set-up line, dry-run by make: no pinned torch, the environment's packages seen."""
    import subprocess

    line = next(line for line in README.read_text().splitlines() if "SYSTEM_TORCH=1" in line and line.startswith("make"))
    target_and_vars = line.split("&&")[-1].split()[1:]  # e.g. ['demo', 'SYSTEM_TORCH=1']
    root = README.parent
    dry = subprocess.run(["make", "-n", "-B", *target_and_vars], cwd=root, capture_output=True, text=True, check=True).stdout
    assert "--system-site-packages" in dry and "torch==" not in dry and "timm==" not in dry
    pinned = subprocess.run(["make", "-n", "-B", "install"], cwd=root, capture_output=True, text=True, check=True).stdout
    order = [pinned.index(p) for p in ("torch==2.13.0", "torchvision==0.28.0", "timm==1.0.31")]
    assert order == sorted(order) and "--system-site-packages" not in pinned


def test_the_python_example_trains_and_quantizes_as_the_commands_do():
    """The README's API example and its commands resolve to the same settings (policy lives in the configs)."""
    from sparseinv import DistillConfig, QuantConfig
    from sparseinv.cli import build_parser
    from sparseinv.cli.distill import config_from
    from sparseinv.cli.quantize import config_from as quant_config_from

    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    api_distill = eval(re.search(r"DistillConfig\.for_student\([^)]*\)", code).group(0), {"DistillConfig": DistillConfig})
    api_quant = eval(re.search(r"QuantConfig\.for_method\([^)]*\)", code).group(0), {"QuantConfig": QuantConfig})
    commands = readme_commands()
    depth = next(c for c in commands if c.startswith("sparseinv distill") and "--depth" in c)
    quant = next(c for c in commands if c.startswith("sparseinv quantize") and "--a-bits 4" in c)
    assert config_from(build_parser().parse_args(shlex.split(depth)[1:])) == api_distill
    assert quant_config_from(build_parser().parse_args(shlex.split(quant)[1:])) == api_quant


@pytest.mark.parametrize("kind, options", [("timm", ["--student", "test_vit"]), ("depth", ["--blocks", "0", "2"]),
                                           ("quantized", ["--quantized", "q.safetensors"])])
def test_every_student_kind_resolves_through_its_config(kind, options):
    from sparseinv import DistillConfig
    from sparseinv.cli import build_parser
    from sparseinv.cli.distill import config_from

    base = ["distill", "--teacher", "test_vit", "--pool", "p", "--out", "o.safetensors", *options]
    assert config_from(build_parser().parse_args(base)) == DistillConfig.for_student(kind)
    # Given options win over the student's defaults, the same way in both.
    given = config_from(build_parser().parse_args([*base, "--lr", "0.003", "--mix", "none", "--feature-weight", "0"]))
    assert given == DistillConfig.for_student(kind, lr=0.003, mix="none", feature_weight=0.0)



def test_invert_resolves_to_the_apis_defaults_and_its_options_to_the_same_fields(monkeypatch):
    """`sparseinv invert` with no settings is InversionConfig() on the reference schedule; options land in their fields."""
    from sparseinv import InversionConfig, InversionLoss, PruneSchedule
    from sparseinv.cli import build_parser
    from sparseinv.cli.invert import config_from

    base = ["invert", "--model", "test_vit", "--out", "pool"]
    assert config_from(build_parser().parse_args(base)) == InversionConfig(schedule=PruneSchedule.reference(4000))
    given = config_from(build_parser().parse_args([*base, "--iterations", "400", "--lr", "0.1", "--tv-l1", "0.5", "--head-similarity", "2"]))
    assert given == InversionConfig(iterations=400, lr=0.1, schedule=PruneSchedule.reference(400),
                                    loss=InversionLoss(tv_l1=0.5, head_similarity=2.0))
    # A default changed in the API is the command's too: the command restates none of them.
    import sparseinv.inversion.losses as losses

    monkeypatch.setattr(losses.InversionLoss, "__init__", _with_default(losses.InversionLoss.__init__, tv_l2=5e-4))
    assert config_from(build_parser().parse_args(base)).loss.tv_l2 == 5e-4


def _with_default(init, **defaults):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **{**defaults, **kwargs})
    return wrapped
