"""Bringing your own model: fine-tuned checkpoints, hub names, and what a mismatch says."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import save_file

from sparseinv.cli import main
from sparseinv.cli.common import split_model_spec
from sparseinv.errors import UsageError
from sparseinv.models import check_model_name, load_model, timm


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "test_vit10.safetensors"
    save_file(timm.create_model("test_vit", num_classes=10).state_dict(), str(path))
    return path


def test_a_fine_tuned_checkpoint_inverts_from_the_command_line(ten_classes, tmp_path):
    assert main(["invert", "--model", "test_vit", "--checkpoint", str(ten_classes), "--iterations", "2", "--dense", "--num-images", "2",
                 "--batch-size", "2", "--out", str(tmp_path / "pool"), "--quiet"]) == 0
    assert '"num_classes": 10' in (tmp_path / "pool" / "run.json").read_text()


def test_num_classes_can_be_given_and_a_wrong_one_names_the_shapes(ten_classes, tmp_path, capsys):
    assert load_model("test_vit", ten_classes, num_classes=10).num_classes == 10
    capsys.readouterr()
    assert main(["invert", "--model", "test_vit", "--checkpoint", str(ten_classes), "--num-classes", "7", "--iterations", "2", "--dense",
                 "--out", str(tmp_path / "pool"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "head.weight is (10, 64) in the file, (7, 64) in the model" in err and err.count("\n") == 1


def test_a_mismatch_names_missing_and_unexpected_tensors(tmp_path):
    state = timm.create_model("test_vit").state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["norm.bias"]
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(UsageError) as err:
        load_model("test_vit", path)
    assert "1 tensor missing from the file (norm.bias)" in str(err.value) and "1 tensor not in the model (extra.weight)" in str(err.value)


def test_hub_names_and_pretrained_tags_are_names_timm_resolves():
    check_model_name("hf-hub:timm/deit_tiny_patch16_224.fb_in1k")
    check_model_name("deit_tiny_patch16_224.fb_in1k")
    with pytest.raises(UsageError, match="ORGANISATION/REPOSITORY"):
        check_model_name("hf-hub:deit")
    with pytest.raises(UsageError, match="unknown model"):
        check_model_name("deit_nano")
    assert split_model_spec("hf-hub:timm/deit_tiny_patch16_224.fb_in1k:w.safetensors") == \
        ("hf-hub:timm/deit_tiny_patch16_224.fb_in1k", "w.safetensors")
    assert split_model_spec("hf-hub:timm/deit_tiny_patch16_224.fb_in1k") == ("hf-hub:timm/deit_tiny_patch16_224.fb_in1k", None)
    assert split_model_spec("test_vit:a.safetensors") == ("test_vit", "a.safetensors")


def test_a_hub_name_offline_says_what_to_pass(capsys, tmp_path):
    assert main(["invert", "--model", "hf-hub:timm/deit_tiny_patch16_224.fb_in1k", "--iterations", "2", "--dense",
                 "--out", str(tmp_path / "pool"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not fetch pretrained weights" in err and "--checkpoint" in err and err.count("\n") == 1


def test_checkpoint_and_random_weights_together_are_refused(ten_classes, tmp_path, capsys):
    assert main(["invert", "--model", "test_vit", "--checkpoint", str(ten_classes), "--random-weights",
                 "--out", str(tmp_path / "pool"), "--quiet"]) == 2
    assert "not both" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("sparseinv ")


FAVOURED = 5


@pytest.mark.slow
def test_a_fine_tuned_37_class_deit_small_goes_from_inversion_to_an_int8_onnx_file_with_no_python(tmp_path, capsys):
    """A user's own model, as a timm training checkpoint: invert -> quantize -> export -> evaluate --onnx."""
    from PIL import Image

    from sparseinv.data import ImageFolder, transform_folder
    from sparseinv.quant.export import onnx_logits, onnx_session

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", num_classes=37).eval()
    with torch.no_grad():
        model.head.bias[FAVOURED] += 10.0  # random weights that prefer one class by far: predictions known, and not by class order
    ckpt = tmp_path / "my_finetuned_37_classes.pth"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DistributedDataParallel
    torch.save({"epoch": 3, "state_dict": state, "state_dict_ema": state}, ckpt)
    data = tmp_path / "pets"
    for c in range(37):  # 37 class folders, named as the user named them: sorted order is the class order
        (data / f"breed_{c:02d}").mkdir(parents=True)
        Image.new("RGB", (240, 240), (7 * c, 90, 200 - 5 * c)).save(data / f"breed_{c:02d}" / "0.jpg")
    for i in (1, 2):  # the favoured class's folder holds three images, every other one
        Image.new("RGB", (240, 240), (90, 60 * i, 30)).save(data / f"breed_{FAVOURED:02d}" / f"{i}.jpg")
    base = ["--model", "deit_small_patch16_224", "--checkpoint", str(ckpt), "--quiet"]
    pool, quantized, onnx = tmp_path / "pool", tmp_path / "q.safetensors", tmp_path / "q.onnx"
    assert main(["invert", *base, "--num-images", "2", "--batch-size", "2", "--iterations", "6", "--classes", "0", "36",
                 "--out", str(pool)]) == 0
    assert main(["quantize", *base, "--calib", str(pool), "--method", "calib", "--calib-num-images", "2", "--out", str(quantized)]) == 0
    assert main(["export", "--model", "deit_small_patch16_224", "--checkpoint", str(ckpt), "--quantized", str(quantized),
                 "--out", str(onnx)]) == 0
    capsys.readouterr()
    report = tmp_path / "onnx.json"
    assert main(["evaluate", "--model", "deit_small_patch16_224", "--onnx", str(onnx), "--data", str(data), "--json", str(report),
                 "--quiet"]) == 0
    result = json.loads(report.read_text())
    # Sorted folder order is the class order: only breed_05's three images are right (another order, or
    # evaluating anything but the exported model, gives another number); counted here from the ONNX file too.
    images, labels = transform_folder(ImageFolder.scan(data), model)
    predicted = onnx_logits(onnx_session(onnx), images).argmax(1)
    assert predicted.tolist() == [FAVOURED] * 39
    assert result["num_images"] == 39 and result["top1"] == 100.0 * int((predicted == labels).sum()) / 39 == 300 / 39
    assert "ONNX" in capsys.readouterr().out
