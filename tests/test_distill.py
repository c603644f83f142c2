"""Distillation: the KD loss, head rebuilding, sparse feeding, resume, growth and the CLI's refusals."""

from __future__ import annotations

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sparseinv import InversionConfig, PruneSchedule, invert, load_model, read_pool
from sparseinv.cli import main
from sparseinv.data import ImageFolder, read_class_index, transform_folder
from sparseinv.distill import DistillConfig, RoundsConfig, distill, distill_with_rounds, kd_loss
from sparseinv.runs.inversion import run_record
from sparseinv.models import timm
from sparseinv.pool import PoolWriter

TEACHER_CLASSES, STUDENT_CLASSES = 5, 7
KEPT = 49  # 100 -> 70 -> 49 while inverting; the final mask (last-phase, the default) keeps those 49


def _save(model, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 5-class test_vit teacher, a 7-class test_vit student, and a sparse pool from the teacher."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teacher_ckpt = _save(timm.create_model("test_vit", num_classes=TEACHER_CLASSES), root / "teacher.safetensors")
    torch.manual_seed(1)
    student_ckpt = _save(timm.create_model("test_vit", num_classes=STUDENT_CLASSES), root / "student.safetensors")
    teacher = load_model("test_vit", teacher_ckpt, num_classes=TEACHER_CLASSES)
    config = InversionConfig(num_images=4, batch_size=4, iterations=6, schedule=PruneSchedule((2, 4), (0.3, 0.3)))
    invert(teacher, config, out=str(root / "pool"), model_name="test_vit", progress=False)
    return {"root": root, "teacher": teacher_ckpt, "student": student_ckpt, "pool": str(root / "pool")}


def _models(files):
    teacher = load_model("test_vit", files["teacher"], num_classes=TEACHER_CLASSES)
    student = load_model("test_vit", files["student"], num_classes=STUDENT_CLASSES)
    return teacher, student


def test_kd_loss_matches_hand_computed_value():
    s, t, T = [1.0, 2.0, 0.5], [0.2, -1.0, 3.0], 4.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    p, q = softmax(t), softmax(s)
    expected = T * T * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    got = kd_loss(torch.tensor([s, s]), torch.tensor([t, t]), T)  # batch mean of two equal rows
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(torch.tensor([t]), torch.tensor([t]), T).item() == pytest.approx(0.0, abs=1e-7)


def test_linear_probe_rebuilds_head_and_freezes_backbone(files, tmp_path):
    teacher, student = _models(files)
    backbone = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("head.")}
    out = tmp_path / "s.safetensors"
    config = DistillConfig(epochs=6, batch_size=2, lr=0.05, warmup=0, shift_patches=0, flip=False)
    summary = distill(teacher, student, read_pool(files["pool"]), config, out,
                      teacher_name="test_vit", student_name="test_vit", progress=False)
    assert student.num_classes == TEACHER_CLASSES
    state = load_file(str(out))
    assert state["head.weight"].shape == (TEACHER_CLASSES, 64)
    for k, v in backbone.items():
        assert torch.equal(state[k], v), k  # the backbone did not move
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["num_classes"] == TEACHER_CLASSES and meta["epoch"] == 6
    assert (tmp_path / "s.best.safetensors").is_file() and (tmp_path / "s.last.pt").is_file()
    losses = [r["loss"] for r in summary["history"]]
    assert losses[-1] < 0.5 * losses[0], losses  # the same images every epoch: the head fits them
    # The saved student loads back as a 5-class model.
    assert load_model("test_vit", str(out), num_classes=TEACHER_CLASSES).num_classes == TEACHER_CLASSES


@pytest.mark.parametrize("mode", ["linear-probe", "full"])
def test_sparse_images_reach_both_models_as_kept_tokens_only(files, tmp_path, mode):
    teacher, student = _models(files)
    lengths = {"teacher": [], "student": []}
    for role, model in (("teacher", teacher), ("student", student)):
        model.blocks[0].register_forward_hook(lambda m, i, o, role=role: lengths[role].append(i[0].shape[1]))
    pool = read_pool(files["pool"])
    assert pool.is_sparse and pool.kept_patches.shape[1] == KEPT
    distill(teacher, student, pool, DistillConfig(mode=mode, epochs=1, batch_size=2), tmp_path / "s.safetensors", progress=False)
    assert lengths["teacher"] and lengths["student"]
    assert set(lengths["teacher"]) == {1 + KEPT}  # CLS + kept patches, never the 100 of a dense image
    assert set(lengths["student"]) == {1 + KEPT}


def test_resume_after_interruption_gives_the_uninterrupted_weights(files, tmp_path):
    config = DistillConfig(mode="full", epochs=3, batch_size=3, lr=0.05)
    pool = read_pool(files["pool"])
    teacher, student = _models(files)
    distill(teacher, student, pool, config, tmp_path / "a" / "s.safetensors", progress=False)

    def interrupt(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    teacher, student = _models(files)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student, pool, config, tmp_path / "b" / "s.safetensors", progress=False, on_epoch_end=interrupt)
    assert torch.load(tmp_path / "b" / "s.last.pt", weights_only=False)["epoch"] == 1
    teacher, student = _models(files)  # a fresh process would reload both from their files
    summary = distill(teacher, student, pool, config, tmp_path / "b" / "s.safetensors", progress=False)
    assert [r["epoch"] for r in summary["history"]] == [1, 2, 3]
    a, b = load_file(str(tmp_path / "a" / "s.safetensors")), load_file(str(tmp_path / "b" / "s.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], load_file(files["student"])["blocks.0.attn.qkv.weight"])


def test_inverting_during_training_grows_the_pool(files, tmp_path):
    teacher, student = _models(files)
    config = DistillConfig(epochs=3, batch_size=4)
    summary = distill_with_rounds(teacher, student, files["pool"], config, RoundsConfig(invert_every=2, images_per_round=2),
                                  tmp_path / "s.safetensors", teacher_name="test_vit", progress=False)
    assert [r["num_images"] for r in summary["history"]] == [4, 4, 6]
    grown = read_pool(tmp_path / "s.rounds" / "round_001")
    assert len(grown) == 2 and grown.kept_patches.shape[1] == KEPT  # the pool's own (sparse) settings
    assert grown.run["settings"]["seed"] != read_pool(files["pool"]).run["settings"]["seed"]
    assert grown.run["settings"]["loss"]["extra"] == [[1.0, "StudentDisagreement"]]  # aimed at the student by default
    assert summary["inversion_seconds"] > 0


def _val_folder(root):
    for c in range(TEACHER_CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(c * 10 + i).integers(0, 256, (160, 160, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return str(root)


def _top1(model, root, class_index=None, limit=None) -> tuple[float, list[int]]:
    """Top-1 of ``model`` on a folder, counted here: timm's own forward, argmax against the folder's labels."""
    folder = ImageFolder.scan(root, class_index, limit)
    images, labels = transform_folder(folder, model)
    with torch.no_grad():
        predicted = model.eval()(images).argmax(1)
    return 100.0 * int((predicted == labels).sum()) / len(labels), predicted.tolist()


def test_cli_distills_and_reads_teacher_classes_from_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "student.safetensors"
    code = main(["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--student", "test_vit", "--student-checkpoint", str(files['student']),
                 "--pool", files["pool"], "--epochs", "2", "--batch-size", "2", "--val", _val_folder(tmp_path / "val"),
                 "--out", str(out), "--quiet"])
    assert code == 0
    meta = json.loads((tmp_path / "student.json").read_text())
    assert meta["num_classes"] == TEACHER_CLASSES
    # The last epoch's val top-1 is the saved student's, counted independently on the val images.
    expected, _ = _top1(load_model("test_vit", str(out), num_classes=TEACHER_CLASSES), tmp_path / "val")
    assert [r["epoch"] for r in meta["history"]] == [1, 2] and meta["history"][-1]["val_top1"] == expected
    assert meta["val_top1"] == expected
    assert "linear-probe distillation" in capsys.readouterr().out


def _refused(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparseinv: error: ")
    return err


def test_cli_refuses_a_pool_from_another_model(files, tmp_path, capsys):
    err = _refused(capsys, ["distill", "--teacher", "test_vit2", "--teacher-checkpoint", str(files['teacher']), "--student", "test_vit",
                            "--pool", files["pool"], "--out", str(tmp_path / "s.safetensors")])
    assert "test_vit2" in err and "teacher" in err


def test_cli_a_non_vit_student_sees_sparse_images_whole_and_says_so(files, tmp_path, capsys):
    capsys.readouterr()
    assert main(["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--student", "test_resnet", "--student-random-weights",
                 "--pool", files["pool"], "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "s.safetensors"), "--quiet"]) == 0
    assert "not a token-sequence ViT: it sees the sparse images whole" in capsys.readouterr().err


def test_cli_refuses_an_empty_pool(files, tmp_path, capsys):
    teacher = load_model("test_vit", files["teacher"], num_classes=TEACHER_CLASSES)
    empty = tmp_path / "empty"
    PoolWriter(empty, run_record(teacher, InversionConfig(num_images=4, iterations=6), "test_vit", None)).open()
    err = _refused(capsys, ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--student", "test_vit",
                            "--pool", str(empty), "--out", str(tmp_path / "s.safetensors")])
    assert "no images" in err
    (tmp_path / "bare").mkdir()
    err = _refused(capsys, ["distill", "--teacher", "test_vit", "--student", "test_vit",
                            "--pool", str(tmp_path / "bare"), "--out", str(tmp_path / "s.safetensors")])
    assert "not a sparseinv pool" in err


def test_a_cnn_student_learns_from_a_dense_pool(files, tmp_path):
    teacher = load_model("test_vit", files["teacher"], num_classes=TEACHER_CLASSES)
    config = InversionConfig(num_images=2, batch_size=2, iterations=2)
    invert(teacher, config, out=str(tmp_path / "dense"), model_name="test_vit", progress=False)
    pool = read_pool(tmp_path / "dense")
    assert not pool.is_sparse
    torch.manual_seed(0)
    student = timm.create_model("test_resnet").eval()
    config = DistillConfig(mode="full", epochs=8, batch_size=2, lr=1e-3, warmup=0, shift_patches=0, flip=False)
    summary = distill(teacher, student, pool, config, tmp_path / "s.safetensors", progress=False)
    assert student.num_classes == TEACHER_CLASSES and summary["epoch"] == 8
    losses = [r["loss"] for r in summary["history"]]
    assert losses[-1] < 0.5 * losses[0], losses  # it learns the teacher's outputs on its images


def test_val_images_reach_the_student_as_its_eval_transform_makes_them(files, tmp_path):
    """Validation during distillation feeds the student its own eval transform's output, normalised once."""
    from sparseinv.distill.train import evaluate_student

    student = load_model("test_vit", files["student"], num_classes=STUDENT_CLASSES)
    val = _val_folder(tmp_path / "val")
    folder = ImageFolder.scan(val)
    fed = []
    handle = student.patch_embed.register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0]))
    try:
        result = evaluate_student(student, folder)
    finally:
        handle.remove()
    images, _ = transform_folder(folder, student)
    assert torch.equal(torch.cat(fed), images)
    assert (result["num_images"], result["top1"]) == (2 * TEACHER_CLASSES, _top1(student, val)[0])


def test_cli_val_class_map_and_limit(files, tmp_path, capsys):
    """--val-class-map maps folders to the teacher's classes and --val-limit-per-class takes each folder's first images:
    both change the number; a folder missing from the map is refused."""
    # Two plain colours the trained student (deterministic: this fixture, one epoch) tells apart by a clear margin.
    blue, green = Image.new("RGB", (160, 160), (0, 0, 255)), Image.new("RGB", (160, 160), (0, 255, 0))
    val = tmp_path / "val"
    for folder, first, second in (("class4", blue, green), ("class0", green, blue)):
        (val / folder).mkdir(parents=True)
        first.save(val / folder / "0.png")
        second.save(val / folder / "1.png")
    index = tmp_path / "index.txt"
    index.write_text("".join(f"class{c} name\n" for c in reversed(range(TEACHER_CLASSES))))  # class4 is class 0, class0 class 4
    out = tmp_path / "student.safetensors"
    argv = ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--student", "test_vit", "--student-checkpoint", str(files['student']),
            "--pool", files["pool"], "--epochs", "1", "--batch-size", "2", "--val", str(val),
            "--val-class-map", str(index), "--val-num-images-per-class", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    got = json.loads((tmp_path / "student.json").read_text())["history"][0]["val_top1"]
    student = load_model("test_vit", str(out), num_classes=TEACHER_CLASSES)
    mapped = read_class_index(index)
    expected, predicted = _top1(student, val, mapped, 1)
    assert predicted == [4, 0]  # class0/0.png (green) is class 4 under the map, class4/0.png (blue) class 0
    assert got == expected == 100.0
    # Sorted folder order (class0 -> 0, class4 -> 1) or every image would give other numbers.
    assert _top1(student, val, {"class0": 0, "class4": 1}, 1)[0] == 0.0 and _top1(student, val, mapped)[0] == 50.0
    index.write_text("class0 name\n")
    err = _refused(capsys, argv)
    assert "not in the class map" in err


def test_cli_depth_student_is_the_teachers_shallow_copy_and_evaluates(files, tmp_path, capsys):
    """distill --depth N -> a smaller model that evaluate reads back at its own depth and class count."""
    out = tmp_path / "small.safetensors"
    assert main(["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--depth", "3", "--pool", files["pool"],
                 "--epochs", "1", "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    assert "full distillation" in capsys.readouterr().out  # a copy of the teacher trains every weight by default
    config = json.loads((tmp_path / "small.json").read_text())["settings"]["config"]
    assert (config["feature_weight"], config["feature_layers"]) == (1.0, "blocks")  # a shallow copy matches tokens block by block
    assert config["mix"] == "mixup"  # and trains on blends of pool images
    assert (config["optimizer"], config["lr"]) == ("adamw", 2e-5)  # at a gentler rate than other whole networks
    state = load_file(str(out))
    assert {int(k.split(".")[1]) for k in state if k.startswith("blocks.")} == {0, 1, 2}
    teacher = load_file(files["teacher"])
    assert not torch.equal(state["blocks.1.attn.qkv.weight"], teacher["blocks.2.attn.qkv.weight"])  # block 2 of 6, trained
    val = _val_folder(tmp_path / "val")
    assert main(["evaluate", "--model", "test_vit", "--checkpoint", str(out), "--data", val, "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    record = json.loads((tmp_path / "e.json").read_text())
    # What evaluate reports is the 3-block, 5-class model the file holds, counted here from a timm model built by hand.
    by_hand = timm.create_model("test_vit", depth=3, num_classes=TEACHER_CLASSES)
    by_hand.load_state_dict(state)
    assert record["num_images"] == 2 * TEACHER_CLASSES and record["top1"] == _top1(by_hand, val)[0]


def test_cli_students_other_than_shallow_copies_learn_logits_only_unless_asked(files, tmp_path):
    out = tmp_path / "probe.safetensors"
    base = ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--student", "test_vit", "--student-checkpoint", str(files['student']), "--pool", files["pool"],
            "--epochs", "1", "--batch-size", "2", "--quiet"]
    assert main([*base, "--out", str(out)]) == 0
    config = json.loads((tmp_path / "probe.json").read_text())["settings"]["config"]
    assert (config["feature_weight"], config["feature_layers"]) == (0.0, "final")
    assert "mix" not in config  # no mixing for other students
    assert config["lr"] == 0.01  # the linear probe's SGD rate
    assert main([*base, "--mode", "full", "--feature-weight", "0.5", "--out", str(tmp_path / "asked.safetensors")]) == 0
    config = json.loads((tmp_path / "asked.json").read_text())["settings"]["config"]
    assert (config["feature_weight"], config["feature_layers"]) == (0.5, "final")


def test_cli_quantized_student_trains_and_its_file_evaluates(files, tmp_path, capsys):
    """quantize -> distill --quantized -> evaluate --quantized, with no Python."""
    q, qat = tmp_path / "q.safetensors", tmp_path / "qat.safetensors"
    teacher = ["--model", "test_vit", "--checkpoint", files["teacher"]]
    assert main(["quantize", *teacher, "--calib", files["pool"], "--w-bits", "4", "--a-bits", "8", "--recon-iters", "2",
                 "--calib-num-images", "4", "--out", str(q), "--quiet"]) == 0
    assert main(["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--quantized", str(q), "--pool", files["pool"],
                 "--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--qat-learn", "all", "--out", str(qat), "--quiet"]) == 0
    config = json.loads((tmp_path / "qat.json").read_text())["settings"]["config"]
    assert config["qat_learn"] == "all"
    assert (config["feature_weight"], config["feature_layers"]) == (1.0, "blocks")  # made from the teacher: tokens matched
    assert "mix" not in config  # mixing unmeasured for quantized students: off
    before, after = load_file(str(q)), load_file(str(qat))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("w_int"))  # codes moved
    val = _val_folder(tmp_path / "val")
    assert main(["evaluate", *teacher, "--quantized", str(qat), "--data", val, "--quiet"]) == 0
    err = _refused(capsys, ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--quantized", str(q), "--mode", "linear-probe",
                            "--pool", files["pool"], "--out", str(tmp_path / "x.safetensors")])
    assert "full mode" in err


def test_cli_takes_one_kind_of_student(files, tmp_path, capsys):
    base = ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--pool", files["pool"], "--out", str(tmp_path / "s.safetensors")]
    with pytest.raises(SystemExit):
        main([*base, "--student", "test_vit", "--depth", "2"])
    err = _refused(capsys, [*base, "--depth", "9"])
    assert "--depth 9" in err
    err = _refused(capsys, [*base, "--depth", "2", "--student-random-weights"])
    assert "--student-random-weights" in err


def test_cli_shallow_copy_with_cached_targets_trains_unmixed(files, tmp_path):
    """Mixing needs the teacher on every mixed view: with --targets cached a --depth student's default is no mixing."""
    out = tmp_path / "cached.safetensors"
    assert main(["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(files['teacher']), "--depth", "3", "--pool", files["pool"], "--targets", "cached",
                 "--feature-weight", "0", "--epochs", "1", "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    assert "mix" not in json.loads((tmp_path / "cached.json").read_text())["settings"]["config"]
