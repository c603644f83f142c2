"""Class names and folder-to-class maps (timm's ImageNet list, no file of our own)."""

from __future__ import annotations

import pytest

from sparseinv.classes import folder_class_index, imagenet_synsets, resolve_classes
from sparseinv.errors import UsageError


def test_classes_by_index_synset_or_any_part_of_the_imagenet_name():
    assert resolve_classes(["0", "n01443537", "Tench", "golden retriever", "Tinca tinca", "999"], 1000) == (0, 1, 0, 207, 0, 999)


@pytest.mark.parametrize("tokens, classes, message", [
    (["1000"], 1000, "classes 0..999"),
    (["-1"], 1000, "classes 0..999"),
    (["crane"], 1000, "ambiguous: it names classes 134, 517"),
    (["golden retreiver"], 1000, "did you mean 'golden retriever'"),
    (["tench"], 10, "have none: give class indices"),
])
def test_bad_classes_are_refused_with_what_to_do(tokens, classes, message):
    with pytest.raises(UsageError, match=message):
        resolve_classes(tokens, classes)


def test_imagenet_synset_folders_map_by_synset_not_by_sorted_position():
    synsets = imagenet_synsets()
    folders = ["n01440764", "n02102040", "n03000684"]  # Imagenette's first classes: 0, 217, 491
    index, note = folder_class_index(folders, 1000)
    assert index == {f: synsets[f] for f in folders} == {"n01440764": 0, "n02102040": 217, "n03000684": 491}
    assert "3 ImageNet class folders" in note


def test_folders_map_in_sorted_order_only_when_the_counts_match(tmp_path):
    assert folder_class_index(["cat", "dog"], 2) == (None, None)
    # A 10-class fine-tuned model on synset folders: sorted order, the way it was trained.
    assert folder_class_index(sorted(imagenet_synsets())[:10], 10) == (None, None)
    with pytest.raises(UsageError, match="2 class folders .* and the model 1000 classes.*--class-map"):
        folder_class_index(["cat", "dog"], 1000)
    class_map = tmp_path / "map.txt"
    class_map.write_text("dog\ncat\n")
    assert folder_class_index(["cat", "dog"], 1000, class_map) == ({"dog": 0, "cat": 1}, None)


def test_the_old_class_index_spelling_still_works_with_a_note_and_the_new_one_wins(capsys):
    from sparseinv.cli import build_parser

    parser = build_parser()
    base = ["evaluate", "--model", "m", "--data", "d"]
    assert parser.parse_args([*base, "--class-index", "old.txt"]).class_map == "old.txt"
    assert "note: --class-index is now --class-map." in capsys.readouterr().err
    for order in (["--class-index", "old.txt", "--class-map", "new.txt"], ["--class-map", "new.txt", "--class-index", "old.txt"]):
        assert parser.parse_args([*base, *order]).class_map == "new.txt"
    assert parser.parse_args(["distill", "--teacher", "t", "--depth", "2", "--pool", "p", "--out", "o",
                              "--val-class-index", "old.txt"]).val_class_map == "old.txt"
