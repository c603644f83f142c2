"""Rounds aimed at the student: the disagreement term, the step replay it reads, and the frozen student of a round."""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinv import InversionConfig, PruneSchedule, load_model, read_pool
from sparseinv.distill import DistillConfig
from sparseinv.quant.qat import in_qat, start_qat
from sparseinv.errors import UsageError
from sparseinv.inversion.loop import invert_batch
from sparseinv.inversion.losses import InversionLoss, LossInputs, StudentDisagreement, js_divergence
from sparseinv.runs.rounds import RoundsConfig, distill_with_rounds, frozen_student
from sparseinv.vit.forward import sparse_forward
from conftest import teacher_and_pool, teacher_and_quantized

SCHEDULE = PruneSchedule((2, 4), (0.3, 0.3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return teacher_and_pool(tmp_path_factory.mktemp("rounds"))


def other_vit(path, seed: int):
    """Another random 5-class test_vit (the teacher's classes), saved and loaded as a student would be."""
    from safetensors.torch import save_file

    from sparseinv.models import timm

    torch.manual_seed(seed)
    save_file(timm.create_model("test_vit", num_classes=5).state_dict(), str(path))
    return load_model("test_vit", path)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=3, max_size=3), st.lists(st.floats(-8, 8), min_size=3, max_size=3))
def test_js_is_symmetric_bounded_and_zero_only_for_the_same_prediction(a, b):
    p, q = torch.tensor([a]), torch.tensor([b])
    js = float(js_divergence(p, q))
    assert js == pytest.approx(float(js_divergence(q, p)), abs=1e-6)
    assert -1e-6 <= js <= math.log(2) + 1e-6
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-6)


def test_js_of_two_confident_different_predictions_is_ln2_and_the_term_is_zero_there():
    teacher, student = torch.tensor([[50.0, 0.0, 0.0]]), torch.tensor([[0.0, 50.0, 0.0]])
    assert float(js_divergence(teacher, student)) == pytest.approx(math.log(2), abs=1e-6)
    inputs = LossInputs(images=torch.zeros(1, 3, 4, 4), logits=teacher, targets=torch.tensor([0]), fed=lambda model: student)
    assert float(StudentDisagreement(torch.nn.Identity())(inputs)) == pytest.approx(0.0, abs=1e-6)
    inputs = LossInputs(images=torch.zeros(1, 3, 4, 4), logits=teacher, targets=torch.tensor([0]), fed=lambda model: teacher)
    assert float(StudentDisagreement(torch.nn.Identity())(inputs)) == pytest.approx(1.0, abs=1e-6)


class _Replay:
    """A zero loss term that feeds another model through ``LossInputs.fed`` and keeps what it saw."""

    def __init__(self, model) -> None:
        self.model, self.gaps, self.grads = model, [], []

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        replayed = inputs.fed(self.model)
        self.gaps.append(float((replayed - inputs.logits).detach().abs().max()))
        self.grads.append(replayed.requires_grad)
        return torch.zeros_like(inputs.logits[:, 0])


@pytest.mark.parametrize("schedule", [None, SCHEDULE], ids=["dense", "sparse"])
def test_fed_replays_exactly_what_the_teacher_saw_this_step(setup, schedule):
    """The same model through ``fed`` gives the step's own logits: same roll, flip, colour shift and tokens."""
    teacher = load_model("test_vit", setup["ckpt"])
    replay = _Replay(teacher)
    config = InversionConfig(num_images=2, batch_size=2, iterations=6, color_shift=0.2,
                             schedule=schedule or PruneSchedule(), loss=InversionLoss(extra=[(1.0, replay)]))
    invert_batch(teacher, torch.tensor([1, 3]), config, seed=0, progress=False)
    assert len(replay.gaps) == 6 and max(replay.gaps) < 1e-4 and all(replay.grads)


def test_a_student_of_another_input_size_is_fed_the_whole_image_at_its_own_size(setup):
    from sparseinv.models import timm

    teacher = load_model("test_vit", setup["ckpt"])
    torch.manual_seed(2)
    small = timm.create_model("test_vit", num_classes=5, img_size=96).eval().requires_grad_(False)
    replay, seen = _Replay(small), []
    small.patch_embed.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
    config = InversionConfig(num_images=2, batch_size=2, iterations=4, schedule=SCHEDULE, loss=InversionLoss(extra=[(1.0, replay)]))
    invert_batch(teacher, torch.tensor([1, 3]), config, seed=0, progress=False)
    assert len(replay.gaps) == 4 and all(replay.grads)  # ran, differentiably, on every step
    assert set(seen) == {(96, 96)}


def test_the_term_moves_the_pixels_through_the_student(setup):
    """With the disagreement term alone, the images change as its weight does: its gradient reaches the pixels."""
    teacher = load_model("test_vit", setup["ckpt"])
    student = other_vit(setup["root"] / "other.safetensors", seed=5).eval().requires_grad_(False)

    def images(weight):
        loss = InversionLoss(ce=0.0, tv_l2=0.0, extra=[(weight, StudentDisagreement(student))])
        config = InversionConfig(num_images=2, batch_size=2, iterations=4, schedule=SCHEDULE, loss=loss)
        return invert_batch(teacher, torch.tensor([1, 3]), config, seed=0, progress=False).images

    assert torch.equal(images(0.0), images(0.0))
    assert (images(10.0) - images(0.0)).abs().max() > 1e-3


def test_a_frozen_quantized_student_predicts_as_the_training_one_and_leaves_it_training(setup):
    teacher, q = teacher_and_quantized(setup)
    start_qat(q)
    frozen = frozen_student(q)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(sparse_forward(frozen, x, None).logits, sparse_forward(q.eval(), x, None).logits, atol=1e-5)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert in_qat(q) and not in_qat(frozen) and any(p.requires_grad for p in q.parameters())


def test_rounds_record_the_term_and_a_resumed_round_inverts_against_the_same_student(setup, tmp_path, monkeypatch):
    import sparseinv.runs.rounds as rounds_module

    seen = []

    class Recording(StudentDisagreement):
        def __init__(self, student):
            super().__init__(student)
            seen.append({k: v.clone() for k, v in student.state_dict().items()})
            if len(seen) == 1:  # Ctrl-C as the first round starts
                raise KeyboardInterrupt

    monkeypatch.setattr(rounds_module, "StudentDisagreement", Recording)
    rounds = RoundsConfig(invert_every=2, images_per_round=2, disagreement=1.0)
    out = tmp_path / "s.safetensors"

    def run():
        teacher = load_model("test_vit", setup["ckpt"])
        student = other_vit(tmp_path / "student.safetensors", seed=3)
        return distill_with_rounds(teacher, student, setup["pool"], DistillConfig(epochs=3, batch_size=3), rounds, out, progress=False)

    with pytest.raises(KeyboardInterrupt):
        run()
    summary = run()
    assert len(seen) == 2 and seen[0].keys() == seen[1].keys()
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # the student after epoch 2, both times
    fresh = load_model("test_vit", tmp_path / "student.safetensors").state_dict()
    assert not all(torch.equal(seen[0][k], fresh[k]) for k in fresh)
    assert summary["rounds"]["disagreement"] == 1.0 and [r["num_images"] for r in summary["history"]] == [6, 6, 8]
    assert read_pool(tmp_path / "s.rounds" / "round_001").run["settings"]["loss"]["extra"] == [[1.0, "Recording"]]


def test_rounds_aim_at_the_student_by_default_and_the_option_needs_rounds(capsys):
    from sparseinv.cli import main

    assert RoundsConfig(invert_every=1, images_per_round=2).disagreement == 1.0
    with pytest.raises(UsageError, match="negative"):
        RoundsConfig(invert_every=1, images_per_round=2, disagreement=-1.0).validate()
    assert main(["distill", "--teacher", "test_vit", "--student", "test_vit", "--pool", "p", "--out", "o.safetensors",
                 "--round-disagreement", "1"]) == 2
    assert "--invert-every" in capsys.readouterr().err
