"""Make the 10-class Imagenette teacher for the distillation benchmark (SPEC section 6).

A fixture made with real data (``train100``); it never feeds a student.

Recipe (deterministic, a few minutes on 2 CPU cores): start from the real ImageNet
DeiT-Tiny weights; initialise a 10-way head from the ImageNet head rows of the ten
Imagenette synsets; freeze the first ``depth - 1`` blocks and fine-tune only the last
block, the final norm and the head (AdamW, lr 1e-4, wd 0.05, 8 epochs, batch 50,
seed 0, timm's eval transform, no augmentation). Because the frozen blocks see the
same pixels every epoch, the tokens entering the last block are computed once and
cached; training then costs one block per step.

The tokens entering the last block are cached for ``train100`` and for a fixed
balanced subset of ``val`` (the first ``VAL_PER_CLASS`` images, sorted by name, of
each class) under ``benchmarks/cache/teacher/``. The teacher's first blocks are the
ImageNet blocks, so ``benchmarks/distill.py`` reuses the val cache to evaluate
linear-probe students (frozen ImageNet backbone) without another pass over val.

Writes ``benchmarks/cache/teacher/deit_tiny_imagenette10.safetensors`` (+ ``.json``
with its val top-1) and reuses them when present.

    .venv/bin/python benchmarks/make_teacher.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, SYNSETS, TRAIN100, VAL  # noqa: E402
from sparseinv import load_model  # noqa: E402
from sparseinv.data import ImageFolder, load_images, read_class_index  # noqa: E402
from sparseinv.inversion.sparse_forward import embed_tokens  # noqa: E402

TEACHER_DIR = CACHE / "teacher"
TEACHER_CKPT = TEACHER_DIR / "deit_tiny_imagenette10.safetensors"
VAL_PER_CLASS = int(os.environ.get("VAL_PER_CLASS", "100"))
EPOCHS, BATCH, LR, WD, SEED = 8, 50, 1e-4, 0.05, 0


@torch.no_grad()
def tokens_before_last_block(model, folder: ImageFolder, desc: str) -> torch.Tensor:
    """(N, tokens, C) residual stream entering the last block, eval transform, no augmentation."""
    out = []
    start = time.time()
    for i, (images, _) in enumerate(load_images(folder, model, batch_size=50)):
        tokens = model.norm_pre(embed_tokens(model, images))
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        out.append(tokens)
        print(f"\r{desc}: {min(len(folder), (i + 1) * 50)}/{len(folder)} images, {time.time() - start:.0f} s", end="", flush=True)
    print()
    return torch.cat(out)


def cached_tokens(model, folder: ImageFolder, name: str) -> torch.Tensor:
    path = TEACHER_DIR / f"{name}.pt"
    if path.is_file():
        return torch.load(path)
    tokens = tokens_before_last_block(model, folder, name)
    torch.save(tokens, path)
    return tokens


def head_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The last block, the norm and the head on cached tokens (what model(x) would finish)."""
    return model.forward_head(model.norm(model.blocks[-1](tokens)))


def folders() -> tuple[ImageFolder, ImageFolder, list[str]]:
    train = ImageFolder.scan(TRAIN100)
    val = ImageFolder.scan(VAL, limit_per_class=VAL_PER_CLASS)
    return train, val, train.classes


def main() -> dict:
    TEACHER_DIR.mkdir(parents=True, exist_ok=True)
    meta_path = TEACHER_CKPT.with_suffix(".json")
    if TEACHER_CKPT.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        print(f"teacher cached: {TEACHER_CKPT} (val top-1 {meta['val_top1']:.2f} on {meta['val_images']} images)")
        return meta
    torch.manual_seed(SEED)
    start = time.time()
    train, val, classes = folders()
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    imagenet_index = read_class_index(SYNSETS)
    rows = torch.tensor([imagenet_index[c] for c in classes])
    # A 10-way head from the ImageNet rows of the same classes: a strong, honest start.
    weight, bias = model.head.weight.data[rows].clone(), model.head.bias.data[rows].clone()
    model.reset_classifier(len(classes))
    model.head.weight.data.copy_(weight)
    model.head.bias.data.copy_(bias)

    train_tokens = cached_tokens(model, train, "train100_tokens")
    val_tokens = cached_tokens(model, val, f"val{VAL_PER_CLASS}_tokens")
    train_labels = torch.tensor(train.labels)
    val_labels = torch.tensor(val.labels)
    cache_seconds = time.time() - start

    trainable = [*model.blocks[-1].parameters(), *model.norm.parameters(), *model.head.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WD)
    generator = torch.Generator().manual_seed(SEED)
    train_start = time.time()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(train_labels), generator=generator)
        total = 0.0
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            loss = F.cross_entropy(head_logits(model, train_tokens[idx]), train_labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{EPOCHS}: train loss {total / len(order):.4f}")
    train_seconds = time.time() - train_start
    model.eval()
    with torch.no_grad():
        val_pred = torch.cat([head_logits(model, val_tokens[i : i + 200]).argmax(1) for i in range(0, len(val_labels), 200)])
    top1 = 100.0 * float((val_pred == val_labels).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(TEACHER_CKPT),
              metadata={"model": DEIT_TINY, "num_classes": str(len(classes))})
    meta = {
        "model": DEIT_TINY,
        "checkpoint": str(TEACHER_CKPT),
        "num_classes": len(classes),
        "classes": classes,
        "val_top1": top1,
        "val_images": len(val_labels),
        "val_subset": f"first {VAL_PER_CLASS} images (sorted by name) of each class of {VAL}",
        "recipe": {"trainable": "last block + final norm + 10-way head (init from ImageNet rows)",
                   "optimizer": "AdamW", "lr": LR, "weight_decay": WD, "epochs": EPOCHS,
                   "batch_size": BATCH, "seed": SEED, "augmentation": "none (timm eval transform)",
                   "train": str(TRAIN100)},
        "seconds": {"token_cache": cache_seconds, "train": train_seconds, "total": time.time() - start},
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"teacher: 10-way val top-1 {top1:.2f} on {len(val_labels)} images | {meta['seconds']['total']:.0f} s -> {TEACHER_CKPT}")
    return meta


if __name__ == "__main__":
    main()
