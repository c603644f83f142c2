"""Damaged inputs, unwritable outputs, interrupts, locks and divergence.

Every file the tool reads is damaged here in the ways a disk, a copy or a hand edit
damages files; every command reading it must end with one line on stderr and exit
code 2, and write nothing. Random damage (hypothesis) may also be harmless, and then
the command must simply work.
"""

from __future__ import annotations

import json
import os
import stat
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import interrupt_second_batch, save_test_vit
from sparseinv import InversionConfig, InversionLoss, PruneSchedule, UsageError, invert, load_model
from sparseinv.cli import main
from sparseinv.files import FolderLock, atomic_path, atomic_write, check_writable
from sparseinv.models import timm

NUM_IMAGES = 4


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    """test_vit weights, a sparse 4-image pool, a W8/A8 quantized file and a 2-image folder."""
    root = tmp_path_factory.mktemp("reliability")
    ckpt = save_test_vit(root / "test_vit.safetensors")
    model = load_model("test_vit", ckpt)
    config = InversionConfig(num_images=NUM_IMAGES, batch_size=2, iterations=4, schedule=PruneSchedule((1, 2), (0.5, 0.5)))
    invert(model, config, str(root / "pool"), model_name="test_vit", progress=False)
    quantized = root / "q.safetensors"
    model_args = ["--model", "test_vit", "--checkpoint", str(ckpt)]
    assert main(["quantize", *model_args, "--calib", str(root / "pool"), "--method", "calib", "--w-bits", "8", "--a-bits", "8",
                 "--calib-num-images", str(NUM_IMAGES), "--out", str(quantized), "--quiet"]) == 0
    images = root / "images"
    for i, name in enumerate(("n01440764", "n01443537")):  # ImageNet synsets: evaluate maps them to classes 0 and 1
        (images / name).mkdir(parents=True)
        Image.new("RGB", (160, 160), (40 * i, 90, 200)).save(images / name / "0.png")
    assert main(["evaluate", *model_args, "--data", str(images), "--quantized", str(quantized), "--json", str(root / "eval.json"), "--quiet"]) == 0
    return {"root": root, "ckpt": ckpt, "pool": root / "pool", "quantized": quantized, "images": images, "model": model_args,
            "top1": json.loads((root / "eval.json").read_text())["top1"]}


def _copy_pool(fixtures, tmp_path) -> Path:
    pool = tmp_path / "pool"
    shutil.copytree(fixtures["pool"], pool)
    return pool


def _quantize(fixtures, pool, out) -> list[str]:
    return ["quantize", *fixtures["model"], "--calib", str(pool), "--method", "calib", "--w-bits", "8", "--a-bits", "8",
            "--calib-num-images", str(NUM_IMAGES), "--out", str(out), "--quiet"]


def _evaluate(fixtures, quantized=None, data=None, extra=()) -> list[str]:
    argv = ["evaluate", *fixtures["model"], "--data", str(data or fixtures["images"]), "--quiet", *extra]
    return argv + (["--quantized", str(quantized)] if quantized else [])


def _refused(capsys, argv, message: str | None = None) -> str:
    """The command exits 2 with exactly one line on stderr (containing ``message``)."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    if message:
        assert message in err, err
    return err


def _refused_or_harmless(capsys, argv, output: Path, harmless) -> None:
    """Random damage: either refused (exit 2, one line, ``output`` not written) or harmless: ``output``
    written, and ``harmless(output)`` finds it what the undamaged input gives."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), err
    if code == 2:
        assert len(err.splitlines()) == 1, err
        assert not output.exists()
    else:
        assert output.is_file()
        harmless(output)


def _same_structure(a: Path, b: Path) -> None:
    """Two safetensors files hold tensors of the same names, dtypes and shapes."""
    left, right = load_file(str(a)), load_file(str(b))
    assert {k: (v.dtype, v.shape) for k, v in left.items()} == {k: (v.dtype, v.shape) for k, v in right.items()}


def _same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors (names, dtypes, values)."""
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), key


def _manifest(pool: Path) -> list[dict]:
    return [json.loads(line) for line in (pool / "manifest.jsonl").read_text().splitlines()]


def _write_manifest(pool: Path, entries: list) -> None:
    (pool / "manifest.jsonl").write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))


def _edit_entry(field, value):
    def damage(pool):
        entries = _manifest(pool)
        entries[1][field] = value
        _write_manifest(pool, entries)
    return damage


def _drop_field(field):
    def damage(pool):
        entries = _manifest(pool)
        del entries[2][field]
        _write_manifest(pool, entries)
    return damage


def _edit_run(**changes):
    def damage(pool):
        run = json.loads((pool / "run.json").read_text())
        run.update(changes)
        (pool / "run.json").write_text(json.dumps(run))
    return damage


def _truncate(path_in_pool: str, keep: int = 40):
    def damage(pool):
        path = pool / path_in_pool
        path.write_bytes(path.read_bytes()[:keep])
    return damage


POOL_DAMAGE = {
    "run.json missing": (lambda pool: (pool / "run.json").unlink(), "not a sparseinv pool"),
    "run.json not JSON": (lambda pool: (pool / "run.json").write_text("{\"format\": "), "not valid JSON"),
    "run.json a list": (lambda pool: (pool / "run.json").write_text("[]"), "not a JSON object"),
    "run.json of a newer format": (_edit_run(format="sparseinv-pool/9"), "upgrade sparseinv"),
    "run.json without num_patches": (_edit_run(num_patches=None), "'num_patches'"),
    "manifest missing": (lambda pool: (pool / "manifest.jsonl").unlink(), "holds no images"),
    "manifest line not JSON": (lambda pool: _write_manifest(pool, [*_manifest(pool)[:2], "{\"file\": \"images/0"]), "line 3 is damaged"),
    "manifest line a list": (lambda pool: _write_manifest(pool, [[1, 2]]), "not a JSON object"),
    "manifest line without label": (_drop_field("label"), "lacks 'label'"),
    "manifest line without kept_patches": (_drop_field("kept_patches"), "lacks 'kept_patches'"),
    "label of the wrong type": (_edit_entry("label", "tench"), "wrong 'label'"),
    "label the model lacks": (_edit_entry("label", 1000), "label 1000"),
    "negative label": (_edit_entry("label", -1), "label -1"),
    "kept patch out of range": (_edit_entry("kept_patches", [0, 1, 2, 100]), "outside 0..99"),
    "kept patch repeated": (lambda pool: _edit_entry("kept_patches", [_manifest(pool)[1]["kept_patches"][0]] * len(_manifest(pool)[1]["kept_patches"]))(pool), "repeats"),
    "kept patches of another count": (_edit_entry("kept_patches", [0, 1]), "different numbers of patches"),
    "image outside the pool": (_edit_entry("file", "../q.safetensors"), "outside the pool"),
    "image missing": (lambda pool: (pool / "images" / "000001.png").unlink(), "does not exist"),
    "image truncated": (_truncate("images/000002.png", 200), "cannot be read"),
    "image not an image": (lambda pool: (pool / "images" / "000000.png").write_text("not a png"), "cannot be read"),
    "image of another size": (lambda pool: Image.new("RGB", (32, 32)).save(pool / "images" / "000003.png"), "not 160x160"),
}


@pytest.mark.parametrize("case", list(POOL_DAMAGE))
def test_damaged_pool_is_refused_by_every_reader(capsys, tmp_path, fixtures, case):
    damage, message = POOL_DAMAGE[case]
    pool = _copy_pool(fixtures, tmp_path)
    damage(pool)
    out = tmp_path / "q.safetensors"
    _refused(capsys, _quantize(fixtures, pool, out), message)
    assert not out.exists()
    student = tmp_path / "student.safetensors"
    _refused(capsys, ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(fixtures['ckpt']), "--student", "test_vit", "--student-checkpoint", str(fixtures['ckpt']),
                      "--pool", str(pool), "--epochs", "1", "--out", str(student), "--quiet"], message)
    assert list(tmp_path.iterdir()) == [pool]


def test_continuing_a_damaged_pool_is_refused_and_leaves_it_alone(capsys, tmp_path, fixtures):
    pool = _copy_pool(fixtures, tmp_path)
    _write_manifest(pool, _manifest(pool)[:1])  # run.json records 4 images, the manifest lists 1
    run = json.loads((pool / "run.json").read_text())
    run["complete"] = False
    (pool / "run.json").write_text(json.dumps(run))
    before = {p: p.read_bytes() for p in pool.rglob("*") if p.is_file()}
    argv = ["invert", *fixtures["model"], "--num-images", str(NUM_IMAGES), "--batch-size", "2", "--iterations", "4",
            "--prune-at", "1", "2", "--prune-ratio", "0.5", "0.5", "--out", str(pool), "--quiet"]
    _refused(capsys, argv, "lists 1 images, but run.json records 4")
    assert {p: p.read_bytes() for p in pool.rglob("*") if p.is_file()} == before


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_to_a_manifest_is_refused_or_harmless(capsys, tmp_path_factory, fixtures, data):
    tmp_path = tmp_path_factory.mktemp("manifest")
    pool = _copy_pool(fixtures, tmp_path)
    text = (pool / "manifest.jsonl").read_bytes()
    start = data.draw(st.integers(0, len(text) - 1), label="start")
    length = data.draw(st.integers(1, 12), label="length")
    junk = data.draw(st.binary(min_size=0, max_size=12), label="replacement")
    (pool / "manifest.jsonl").write_bytes(text[:start] + junk + text[start + length :])
    out = tmp_path / "q.safetensors"
    # Harmless here: a quantized model of the same modules (a value changed to another valid one is
    # refused by the line's check: test_a_kept_patch_changed_to_another_valid_one_is_refused).
    _refused_or_harmless(capsys, _quantize(fixtures, pool, out), out, lambda q: _same_structure(q, fixtures["quantized"]))


def test_a_kept_patch_changed_to_another_valid_one_is_refused(capsys, tmp_path, fixtures):
    pool = _copy_pool(fixtures, tmp_path)
    entries = _manifest(pool)
    kept = entries[0]["kept_patches"]
    entries[0]["kept_patches"] = sorted([next(i for i in range(100) if i not in kept), *kept[1:]])
    _write_manifest(pool, entries)
    out = tmp_path / "q.safetensors"
    _refused(capsys, _quantize(fixtures, pool, out), "damaged")


# ---------------------------------------------------------------- quantized files


def _rewrite_quantized(source: Path, dest: Path, edit_tensors=None, edit_meta=None) -> Path:
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dest), metadata=meta)
    return dest


def _first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


QUANTIZED_DAMAGE = {
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[:300]), "not a safetensors file"),
    "not safetensors": (lambda src, dst: dst.write_text("hello"), "not a safetensors file"),
    "header config not JSON": (lambda src, dst: _rewrite_quantized(src, dst, edit_meta=lambda m: m.update(config="{")), "header lacks"),
    "header without fingerprint": (lambda src, dst: _rewrite_quantized(src, dst, edit_meta=lambda m: m.pop("fingerprint")), "header lacks"),
    "another model": (lambda src, dst: _rewrite_quantized(src, dst, edit_meta=lambda m: m.update(model="deit_tiny_patch16_224")), "made for deit_tiny"),
    "unknown scheme": (lambda src, dst: _rewrite_quantized(src, dst, edit_meta=lambda m: m.update(config=json.dumps({**json.loads(m["config"]), "scheme": "fp4"}))), "scheme"),
    "missing tensor": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t.pop(_first_key(t, ".w_int"))), "does not match the modules"),
    "weight codes of another shape": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t.update({(k := _first_key(t, ".w_int")): t[k][:1]})), "not the weight's"),
    "weight codes out of range": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t[_first_key(t, ".w_int")].fill_(-128)), "outside the 8-bit range"),
    "negative step size": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t[_first_key(t, ".scale")].fill_(-1.0)), "not positive"),
    "non-finite scale": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t[_first_key(t, ".w_scale")].fill_(float("nan"))), "not finite"),
    "float zero point": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t.update({(k := _first_key(t, ".zero_point")): t[k].float()})), "integer"),
    "a step size changed, still finite and positive": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t[_first_key(t, ".scale")].mul_(10.0)), "do not match the checksum"),
    "a weight code changed within its range": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t[_first_key(t, ".w_int")].view(-1)[0].copy_(-t[_first_key(t, ".w_int")].view(-1)[0])), "do not match the checksum"),
    "activation scale of another shape": (lambda src, dst: _rewrite_quantized(src, dst, lambda t: t.update({(k := _first_key(t, ".scale")): torch.ones(7)})), "do not fit"),
}


@pytest.mark.parametrize("case", list(QUANTIZED_DAMAGE))
def test_damaged_quantized_file_is_refused(capsys, tmp_path, fixtures, case):
    damage, message = QUANTIZED_DAMAGE[case]
    bad = tmp_path / "bad.safetensors"
    damage(fixtures["quantized"], bad)
    report = tmp_path / "report.json"
    _refused(capsys, _evaluate(fixtures, bad, extra=["--json", str(report)]), message)
    assert not report.exists()


def test_undamaged_quantized_file_evaluates(capsys, tmp_path, fixtures):
    """The damage cases above start from a file that works, so each refusal is the damage's doing."""
    copy = _rewrite_quantized(fixtures["quantized"], tmp_path / "copy.safetensors")
    assert main(_evaluate(fixtures, copy, extra=["--json", str(tmp_path / "r.json")])) == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_to_a_quantized_file_is_refused_or_harmless(capsys, tmp_path_factory, fixtures, data):
    tmp_path = tmp_path_factory.mktemp("quantized")
    raw = fixtures["quantized"].read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    # Half the draws hit the JSON header (names, shapes, offsets, metadata), half anywhere.
    start = data.draw(st.one_of(st.integers(0, header - 1), st.integers(0, len(raw) - 1)), label="start")
    length = data.draw(st.integers(1, 8), label="length")
    junk = data.draw(st.binary(min_size=0, max_size=8), label="replacement")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:start] + junk + raw[start + length :])
    report = tmp_path / "report.json"

    def harmless(report):
        # Evaluated means evaluated as the undamaged file: every tensor and the settings as written.
        _same_tensors(bad, fixtures["quantized"])
        with safe_open(str(bad), framework="pt") as damaged, safe_open(str(fixtures["quantized"]), framework="pt") as intact:
            assert {k: damaged.metadata()[k] for k in ("model", "config", "fingerprint")} == \
                {k: intact.metadata()[k] for k in ("model", "config", "fingerprint")}
        assert json.loads(report.read_text())["top1"] == fixtures["top1"]

    _refused_or_harmless(capsys, _evaluate(fixtures, bad, extra=["--json", str(report)]), report, harmless)


# ---------------------------------------------------------------- checkpoints, folders, class indices


CHECKPOINT_DAMAGE = {
    "text file": (lambda path: path.write_text("weights"), "is not a weights file"),
    "truncated safetensors": (lambda path: path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"), "is not a weights file"),
    "pickle of a list": (lambda path: torch.save([1, 2, 3], path), "no dictionary of weight tensors"),
    "empty dictionary": (lambda path: torch.save({}, path), "no dictionary of weight tensors"),
    "wrong shapes": (lambda path: torch.save({k: v[..., :1] for k, v in timm.create_model("test_vit").state_dict().items()}, path), "does not match"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
@pytest.mark.parametrize("command", ["invert", "quantize", "distill"])
def test_damaged_checkpoint_is_refused(capsys, tmp_path, fixtures, case, command):
    damage, message = CHECKPOINT_DAMAGE[case]
    ckpt = tmp_path / "ckpt.pth"
    damage(ckpt)
    out = tmp_path / "out"
    argv = {
        "invert": ["invert", "--model", "test_vit", "--checkpoint", str(ckpt), "--iterations", "2", "--dense", "--num-images", "1", "--out", str(out)],
        "quantize": ["quantize", "--model", "test_vit", "--checkpoint", str(ckpt), "--calib", "noise", "--w-bits", "8", "--a-bits", "8", "--out", str(out)],
        "distill": ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(ckpt), "--student", "test_vit", "--student-random-weights", "--pool", str(fixtures["pool"]), "--out", str(out)],
    }[command]
    _refused(capsys, [*argv, "--quiet"], message)
    assert not out.exists()


def test_unreadable_image_in_a_folder_is_named(capsys, tmp_path, fixtures):
    data = tmp_path / "images"
    shutil.copytree(fixtures["images"], data)
    (data / "n01443537" / "1.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert "n01443537/1.jpg" in _refused(capsys, _evaluate(fixtures, data=data), "cannot be read")


def test_files_that_are_not_images_are_skipped_with_a_warning(capsys, tmp_path, fixtures):
    data = tmp_path / "images"
    shutil.copytree(fixtures["images"], data)
    (data / "n01440764" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 1 file"):
        assert main(_evaluate(fixtures, data=data, extra=["--json", str(tmp_path / "r.json")])) == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 2


@pytest.mark.parametrize("content, message", [("", "is empty"), ("a x\nb y\na z\n", "names 'a' twice"), (b"\xff\xfe\x00", "cannot be read")])
def test_bad_class_map_is_refused(capsys, tmp_path, fixtures, content, message):
    index = tmp_path / "classes.txt"
    index.write_bytes(content if isinstance(content, bytes) else content.encode())
    _refused(capsys, _evaluate(fixtures, extra=["--class-map", str(index)]), message)


# ---------------------------------------------------------------- outputs, interrupts, locks, divergence


@pytest.mark.parametrize("command", ["invert", "quantize", "evaluate", "distill"])
def test_output_that_cannot_be_written_is_refused_before_work(capsys, tmp_path, fixtures, command):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    out = blocker / "out"
    argv = {
        "invert": ["invert", *fixtures["model"], "--iterations", "2", "--dense", "--num-images", "1", "--out", str(out)],
        "quantize": _quantize(fixtures, fixtures["pool"], out)[:-1],
        "evaluate": _evaluate(fixtures, extra=["--json", str(out)]),
        "distill": ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(fixtures['ckpt']), "--student", "test_vit", "--student-checkpoint", str(fixtures['ckpt']),
                    "--pool", str(fixtures["pool"]), "--out", str(out)],
    }[command]
    _refused(capsys, [*argv, "--quiet"], "is a file, not a folder")
    assert blocker.read_text() == "a file where a folder should be"


@pytest.mark.parametrize("command", ["invert", "quantize", "evaluate", "distill", "export"])
def test_output_on_a_file_system_that_refuses_writes_is_refused_in_one_line(capsys, fixtures, command):
    """/proc lets nobody, not even root, make a folder or a file: permission bits do not say so."""
    out = "/proc/sparseinv-cannot/out"
    argv = {
        "invert": ["invert", *fixtures["model"], "--iterations", "2", "--dense", "--num-images", "1", "--out", out],
        "quantize": _quantize(fixtures, fixtures["pool"], out)[:-1],
        "evaluate": _evaluate(fixtures, extra=["--json", out]),
        "distill": ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(fixtures['ckpt']), "--student", "test_vit", "--student-checkpoint", str(fixtures['ckpt']),
                    "--pool", str(fixtures["pool"]), "--out", out],
        "export": ["export", *fixtures["model"], "--out", out],
    }[command]
    _refused(capsys, argv if command == "export" else [*argv, "--quiet"], "cannot be written")


def test_check_writable_refuses_a_folder_given_as_file(tmp_path):
    with pytest.raises(UsageError, match="is a folder, not a file"):
        check_writable(tmp_path)
    check_writable(tmp_path / "new" / "deeper" / "file.json")  # missing folders can be made
    assert not (tmp_path / "new").exists()  # ... and checking makes none


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.json"
    atomic_write(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new cont")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask_whatever_their_writer(tmp_path, fixtures, umask):
    old = os.umask(umask)
    try:
        quantized = tmp_path / "q.safetensors"  # safetensors writes its own files 0600
        assert main(["quantize", *fixtures["model"], "--calib", str(fixtures["pool"]), "--method", "calib", "--w-bits", "8",
                     "--a-bits", "8", "--calib-num-images", "2", "--out", str(quantized), "--quiet"]) == 0
        atomic_write(tmp_path / "notes.json", "{}")
    finally:
        os.umask(old)
    for path in (quantized, tmp_path / "notes.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_interrupt_keeps_finished_batches_exits_130_and_continues(capsys, tmp_path, fixtures, monkeypatch):
    out = tmp_path / "pool"
    argv = ["invert", *fixtures["model"], "--iterations", "3", "--dense", "--num-images", "4", "--batch-size", "2", "--quiet", "--out", str(out)]
    interrupt_second_batch(monkeypatch)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err
    assert len(_manifest(out)) == 2
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert main(argv) == 0  # the lock went with the interrupted run; the same command continues
    assert len(_manifest(out)) == 4


def test_second_writer_of_a_pool_is_refused_before_its_model_loads(capsys, tmp_path, fixtures, monkeypatch):
    import sparseinv.cli.invert as invert_command

    out = tmp_path / "pool"
    argv = ["invert", *fixtures["model"], "--iterations", "2", "--dense", "--num-images", "1", "--quiet", "--out", str(out)]
    real_loader = invert_command.model_from_args
    monkeypatch.setattr(invert_command, "model_from_args", lambda *a: pytest.fail("the model loaded before the lock was checked"))
    with FolderLock(out):
        _refused(capsys, argv, "being written by another sparseinv process")
        assert not (out / "run.json").exists()
    monkeypatch.setattr(invert_command, "model_from_args", real_loader)
    assert main(argv) == 0


class _NaNLoss(InversionLoss):
    def __call__(self, inputs):
        return inputs.logits.sum(1) * float("nan")


def test_diverging_inversion_stops_before_writing(tmp_path, fixtures):
    model = load_model("test_vit", fixtures["ckpt"])
    config = InversionConfig(num_images=2, batch_size=2, iterations=12, loss=_NaNLoss())
    with pytest.raises(UsageError, match="not finite at step 10"):
        invert(model, config, str(tmp_path / "pool"), model_name="test_vit", progress=False)
    assert not list((tmp_path / "pool" / "images").iterdir())


# ---------------------------------------------------------------- models a user will try


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("test_vit", {"num_classes": 0}, "no classifier"),
        ("vit_small_patch14_reg4_dinov2", {"num_classes": 0, "img_size": 56}, "no classifier"),
        ("eva02_tiny_patch14_224", {"num_classes": 10, "img_size": 56}, "rotary position embeddings"),
        ("eva_giant_patch14_224", {"depth": 1, "embed_dim": 64, "num_heads": 2, "img_size": 56}, "EVA family"),
        ("vit_medium_patch16_gap_256", {"img_size": 64}, "no class token"),
    ],
)
def test_models_we_cannot_invert_are_refused(name, kwargs, message):
    from sparseinv import vit_info

    with pytest.raises(UsageError, match=message):
        vit_info(timm.create_model(name, **kwargs))


def test_a_pool_from_other_weights_is_refused_unless_allowed(capsys, tmp_path, fixtures):
    """A pool from one checkpoint (or random weights) does not calibrate another, nor teach for another teacher, unnoticed."""
    other = save_test_vit(tmp_path / "other.safetensors", seed=1)
    model = ["--model", "test_vit", "--checkpoint", str(other)]
    q = tmp_path / "q.safetensors"
    quantize = ["quantize", *model, "--calib", str(fixtures["pool"]), "--method", "calib", "--calib-num-images", "2", "--out", str(q), "--quiet"]
    err = _refused(capsys, quantize, "other weights")
    assert "--allow-other-weights" in err and not q.exists()
    assert main([*quantize, "--allow-other-weights"]) == 0
    assert "(allowed)" in capsys.readouterr().err
    distill = ["distill", "--teacher", "test_vit", "--teacher-checkpoint", str(other), "--depth", "1", "--pool", str(fixtures["pool"]), "--epochs", "1",
               "--batch-size", "2", "--out", str(tmp_path / "s.safetensors"), "--quiet"]
    _refused(capsys, distill, "other weights")
    assert main([*distill, "--allow-other-weights"]) == 0
    assert "(allowed)" in capsys.readouterr().err
    # Continuing it from the other checkpoint is refused too: its images would come from two models.
    pool = _copy_pool(fixtures, tmp_path)
    config = ["--iterations", "4", "--num-images", str(NUM_IMAGES), "--batch-size", "2", "--prune-at", "1", "2", "--prune-ratio", "0.5", "0.5"]
    _refused(capsys, ["invert", *model, *config, "--out", str(pool), "--quiet"], "other weights")
