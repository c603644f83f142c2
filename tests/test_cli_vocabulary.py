"""One option vocabulary: a spelling means the same thing in every command, every command takes
--device and --quiet, every model is --X with --X-checkpoint, and older spellings still parse."""

from __future__ import annotations

import argparse

import pytest

from sparseinv.cli import build_parser
from sparseinv.cli.common import Renamed, model_and_checkpoint
from sparseinv.errors import UsageError


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every current spelling of ``parser`` and its action (older spellings, hidden, and --help aside)."""
    return {o: a for a in parser._actions if not isinstance(a, (Renamed, argparse._HelpAction)) for o in a.option_strings}


# What an option given to several commands means: its help says so in each of them. An option
# that a second command starts to take needs an entry here, so the meaning is chosen on purpose.
MEANINGS = {
    "--batch-size": "images per optimisation step",
    "-b": "images per optimisation step",
    "--model": "timm model name",
    "--checkpoint": "weights",
    "--random-weights": "random weights",
    "--num-classes": "the classifier's size",
    "--device": "cpu, cuda or cuda:N",
    "--threads": "CPU threads",
    "--quiet": "print only the result",
    "--seed": "seed",
    "--lr": "learning rate",
    "--quantized": "'sparseinv quantize'",
    "--allow-other-weights": "inverted from other weights",
    "--out": "",  # what the command writes: a pool folder, a file, a report folder, each its own
}


def _kind(action: argparse.Action) -> tuple:
    return (action.dest, type(action).__name__, action.type, action.nargs, tuple(action.choices or ()))


def test_a_spelling_means_one_thing_in_every_command():
    seen: dict[str, list[tuple[str, argparse.Action]]] = {}
    for name, parser in commands().items():
        for option, action in options(parser).items():
            seen.setdefault(option, []).append((name, action))
    shared = {option: uses for option, uses in seen.items() if len(uses) > 1}
    assert set(shared) <= set(MEANINGS), f"options shared without a stated meaning: {set(shared) - set(MEANINGS)}"
    for option, uses in shared.items():
        kinds = {name: _kind(action) for name, action in uses}
        assert len(set(kinds.values())) == 1, (option, kinds)
        for name, action in uses:
            assert MEANINGS[option] in (action.help or ""), (option, name, action.help)


def test_every_command_takes_device_and_quiet():
    for name, parser in commands().items():
        assert {"--device", "--quiet"} <= set(options(parser)), name


def test_every_model_is_named_and_given_weights_the_same_way():
    for name, parser in commands().items():
        spelled = options(parser)
        for option, action in spelled.items():
            assert ":" not in str(action.metavar or ""), (name, option, action.metavar)  # no NAME:CHECKPOINT any more
            if option.endswith("-checkpoint") and option != "--checkpoint":
                assert option.removesuffix("-checkpoint") in spelled, (name, option)
        if "--checkpoint" in spelled and name != "demo":  # the demo's model is DeiT-Tiny, always
            assert "--model" in spelled, name


@pytest.mark.parametrize("command, old, dest, value", [
    (["quantize", "--model", "m", "--calib", "noise", "--out", "q"], ["--num-calib", "4"], "calib_num_images", 4),
    (["quantize", "--model", "m", "--calib", "noise", "--out", "q"], ["-b", "4"], "calib_batch_size", 4),
    (["quantize", "--model", "m", "--calib", "noise", "--out", "q"], ["--batch-size", "4"], "calib_batch_size", 4),
    (["evaluate", "--model", "m", "--data", "d"], ["--batch-size", "4"], "eval_batch_size", 4),
    (["evaluate", "--model", "m", "--data", "d"], ["-b", "4"], "eval_batch_size", 4),
    (["evaluate", "--model", "m", "--data", "d"], ["--limit-per-class", "4"], "num_images_per_class", 4),
    (["evaluate", "--model", "m", "--data", "d"], ["--class-index", "f"], "class_map", "f"),
    (["export", "--model", "m", "--out", "o"], ["--batch-size", "4"], "onnx_batch_size", "4"),
    (["export", "--model", "m", "--out", "o"], ["-b", "dynamic"], "onnx_batch_size", "dynamic"),
    (["distill", "--teacher", "t", "--student", "s", "--pool", "p", "--out", "o"], ["--random-student"], "random_student", True),
    (["distill", "--teacher", "t", "--depth", "2", "--pool", "p", "--out", "o"], ["--images-per-round", "4"], "num_images_per_round", 4),
    (["distill", "--teacher", "t", "--depth", "2", "--pool", "p", "--out", "o"], ["--val-limit-per-class", "4"], "val_num_images_per_class", 4),
    (["distill", "--teacher", "t", "--depth", "2", "--pool", "p", "--out", "o"], ["--val-class-index", "f"], "val_class_map", "f"),
])
def test_older_spellings_still_parse_with_a_note(command, old, dest, value, capsys):
    args = build_parser().parse_args([*command, *old])
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: {old[0]} is now --" in err


def test_the_new_spelling_wins_over_the_old_one_in_either_order(capsys):
    base = ["quantize", "--model", "m", "--calib", "noise", "--out", "q"]
    for order in (["-b", "4", "--calib-batch-size", "8"], ["--calib-batch-size", "8", "-b", "4"]):
        assert build_parser().parse_args([*base, *order]).calib_batch_size == 8


def test_name_colon_checkpoint_still_works_with_a_note(capsys):
    assert model_and_checkpoint("test_vit:w.safetensors", None, "--teacher") == ("test_vit", "w.safetensors")
    assert "note: --teacher NAME:CHECKPOINT is now --teacher NAME --teacher-checkpoint CHECKPOINT." in capsys.readouterr().err
    assert model_and_checkpoint("test_vit", "w.safetensors", "--student") == ("test_vit", "w.safetensors")
    assert model_and_checkpoint("hf-hub:timm/deit_tiny_patch16_224.fb_in1k", None, "--teacher") == \
        ("hf-hub:timm/deit_tiny_patch16_224.fb_in1k", None)
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="give it once"):
        model_and_checkpoint("test_vit:a.safetensors", "b.safetensors", "--teacher")
