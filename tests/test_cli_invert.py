"""``sparseinv invert`` end to end, and every bad input: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DEIT_TINY_CKPT, save_test_vit
from sparseinv import UsageError, read_pool, sparse_forward, vit_info
from sparseinv.cli import main
from sparseinv.models import timm

TINY = ["--model", "test_vit", "--random-weights", "--iterations", "8", "--num-images", "2", "--batch-size", "2", "--quiet"]


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prune-at", "3", "2", "--prune-ratio", "0.3", "0.3"], "strictly increasing"),
        (["--prune-at", "2", "8", "--prune-ratio", "0.3", "0.3"], "must lie in 1..7"),
        (["--prune-at", "2", "--prune-ratio", "1.0"], "[0, 1)"),
        (["--prune-at", "1", "2", "--prune-ratio", "0.3"], "one ratio per step"),
        (["--classes", "1000"], "unknown class index 1000"),
        (["--batch-size", "0"], "batch-size must be at least 1"),
        (["--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
    ],
)
def test_bad_settings(capsys, tmp_path, extra, message):
    out = tmp_path / "pool"
    _fails(capsys, ["invert", *TINY, "--out", str(out), *extra], message)
    assert not out.exists()


def test_unknown_model(capsys, tmp_path):
    _fails(capsys, ["invert", "--model", "no_such_vit", "--out", str(tmp_path / "p")], "unknown model 'no_such_vit'")
    assert not (tmp_path / "p").exists()


def test_checkpoint_of_another_model(capsys, tmp_path):
    ckpt = save_test_vit(tmp_path / "other.safetensors")
    argv = ["invert", "--model", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--out", str(tmp_path / "p")]
    _fails(capsys, argv, "does not match model 'deit_tiny_patch16_224'")
    _fails(capsys, ["invert", "--model", "test_vit", "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "p")], "does not exist")
    assert not (tmp_path / "p").exists()


def test_not_a_vit_with_class_token(capsys, tmp_path):
    _fails(capsys, ["invert", "--model", "resnet18", "--random-weights", "--out", str(tmp_path / "p")], "not a token-sequence ViT")
    assert not (tmp_path / "p").exists()


def test_image_size_not_divisible_by_patch():
    with pytest.raises(UsageError, match="not divisible by the patch size"):
        vit_info(timm.create_model("test_vit", img_size=170, dynamic_img_pad=True))


def test_out_holding_other_settings_is_refused_and_untouched(capsys, tmp_path):
    out = tmp_path / "pool"
    assert main(["invert", *TINY, "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _fails(capsys, ["invert", *TINY, "--out", str(out), "--lr", "0.1"], "different settings (lr)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # The same command again finds the pool complete and changes no image.
    assert main(["invert", *TINY, "--out", str(out)]) == 0
    assert all(before[p] == p.read_bytes() for p in before if p.suffix == ".png")


def test_out_that_is_some_other_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _fails(capsys, ["invert", *TINY, "--out", str(tmp_path)], "not a sparseinv pool")


def test_real_deit_tiny_sparse_pool(capsys, tmp_path, deit_tiny):
    out = tmp_path / "pool"
    argv = [
        "invert", "--model", "deit_tiny_patch16_224", "--checkpoint", str(DEIT_TINY_CKPT), "--out", str(out),
        "--num-images", "2", "--batch-size", "2", "--iterations", "8", "--prune-at", "2", "4", "6", "7",
        "--prune-ratio", "0.3", "0.3", "0.3", "0.3", "--classes", "1", "207", "--quiet",
    ]
    assert main(argv) == 0
    assert "sparse inversion: 2 images" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["tokens_per_phase"] == [196, 137, 95, 66, 46]
    assert run["checkpoint"] == str(DEIT_TINY_CKPT) and run["settings"]["lr"] == 0.25
    pool = read_pool(out)
    assert pool.kept_patches.shape == (2, 46) and pool.labels.tolist() == [1, 207]  # the last phase's 46
    info = vit_info(deit_tiny)
    x = (pool.images - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = sparse_forward(deit_tiny, x, pool.kept_patches).logits.softmax(1)
    assert torch.allclose(probs[torch.arange(2), pool.labels], pool.target_prob, atol=1e-4)


def test_invert_is_sparse_by_default_with_the_reference_schedule_scaled_to_the_run(capsys, tmp_path):
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    assert main(["invert", *TINY, "--out", str(sparse)]) == 0
    assert "sparse inversion" in capsys.readouterr().out
    settings = json.loads((sparse / "run.json").read_text())["settings"]
    assert settings["schedule"] == {"steps": [1, 2, 3, 4], "ratios": [0.3] * 4}  # 50/100/200/300 of 4000, at 8 steps
    assert main(["invert", *TINY, "--dense", "--out", str(dense)]) == 0
    assert "dense inversion" in capsys.readouterr().out
    assert json.loads((dense / "run.json").read_text())["settings"]["schedule"] == {"steps": [], "ratios": []}


@pytest.mark.parametrize("extra, message", [
    (["--dense", "--prune-at", "2", "--prune-ratio", "0.5"], "takes no --prune-at"),
    (["--iterations", "4"], "too short for the reference schedule"),
    (["--classes", "crane"], "ambiguous"),
    (["--num-classes", "10", "--classes", "tench"], "have none: give class indices"),
])
def test_schedule_and_class_mistakes_are_refused(capsys, tmp_path, extra, message):
    out = tmp_path / "pool"
    _fails(capsys, ["invert", *TINY, "--out", str(out), *extra], message)
    assert not out.exists()


def test_classes_by_imagenet_name_and_synset(capsys, tmp_path):
    out = tmp_path / "pool"
    assert main(["invert", *TINY, "--out", str(out), "--classes", "tench", "n01443537"]) == 0
    assert read_pool(out).labels.tolist() == [0, 1]
