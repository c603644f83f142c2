"""Class names: ImageNet synsets and descriptions (timm's own list), and folder-to-class maps."""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Sequence

from sparseinv.errors import UsageError

IMAGENET_CLASSES = 1000


@functools.cache
def _imagenet():
    from sparseinv.models import timm  # imported through models: it makes torchvision importable first

    info = timm.data.ImageNetInfo()
    synsets = {name: i for i, name in enumerate(info.label_names())}
    aliases: dict[str, list[int]] = {}
    for i in range(info.num_classes()):
        for alias in info.index_to_description(i).split(","):
            aliases.setdefault(alias.strip().lower(), []).append(i)
    return synsets, aliases


def imagenet_synsets() -> dict[str, int]:
    """``synset -> class index`` of ImageNet-1k, from timm's ImageNet info."""
    return dict(_imagenet()[0])


def resolve_classes(tokens: Sequence[str], num_classes: int) -> tuple[int, ...]:
    """``--classes`` to class indices: numbers, or for a 1000-class model ImageNet synsets and names.

    A name is any comma-separated part of a class's ImageNet description, any case
    ("tench", "Golden Retriever", "n01440764").

    Raises:
        UsageError: an index out of range, an unknown or ambiguous name, or a name for a
            model whose classes have no names.
    """
    out = []
    for token in tokens:
        token = str(token).strip()
        if re.fullmatch(r"-?\d+", token):
            index = int(token)
            if not 0 <= index < num_classes:
                raise UsageError(f"unknown class index {index}: the model has classes 0..{num_classes - 1}.")
            out.append(index)
            continue
        if num_classes != IMAGENET_CLASSES:
            raise UsageError(f"class '{token}' is a name, but the model's {num_classes} classes have none: give class indices.")
        synsets, aliases = _imagenet()
        if token in synsets:
            out.append(synsets[token])
            continue
        found = aliases.get(token.lower())
        if not found:
            close = difflib.get_close_matches(token.lower(), aliases, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise UsageError(f"unknown ImageNet class '{token}'{hint}: give an index, a synset such as n01440764, or a name.")
        if len(found) > 1:
            raise UsageError(f"ImageNet class name '{token}' is ambiguous: it names classes {', '.join(map(str, found))}; "
                             "give the index.")
        out.append(found[0])
    return tuple(out)


def folder_class_index(folders: Sequence[str], num_classes: int, class_map: str | os.PathLike | None = None,
                       where: str = "the data folder") -> tuple[dict[str, int] | None, str | None]:
    """How class folders map to the model's class indices (``None``: sorted folder order), and a note.

    The note (else ``None``) says where the folder count and the model's classes
    disagree, for the caller to show beside its result.

    In order: a class map file when given; ImageNet synset folders (``n01440764``) through
    timm's ImageNet list when the model has 1000 classes; sorted order when there are
    exactly as many folders as classes. Anything else is refused: numbering folders
    0..k-1 of a model with other classes gives a confident wrong answer.

    Raises:
        UsageError: folders that cannot be mapped without a class map.
    """
    if class_map is not None:
        from sparseinv.data import read_class_index

        return read_class_index(class_map), None
    synsets = imagenet_synsets() if num_classes == IMAGENET_CLASSES else {}
    if folders and all(f in synsets for f in folders):
        note = None
        if len(folders) != num_classes:
            note = (f"{len(folders)} ImageNet class folders in {where}, mapped by synset to the model's "
                    f"{num_classes} classes (top-1 is {num_classes}-way).")
        return {f: synsets[f] for f in folders}, note
    if len(folders) == num_classes:
        return None, None
    raise UsageError(f"{where} has {len(folders)} class folders ({', '.join(list(folders)[:3])}{', ...' if len(folders) > 3 else ''}) "
                     f"and the model {num_classes} classes: the folders cannot be matched to classes by name or order. "
                     "Pass --class-map FILE (line i names class i's folder).")
