"""Make the 10-class Imagenette teacher of the distillation benchmark's paper protocol.

A fixture made with real data (``train100``); it never feeds a student.

Recipe (deterministic, a few minutes on 2 CPU cores): start from the real ImageNet
DeiT-Tiny weights; initialise a 10-way head from the ImageNet head rows of the ten
Imagenette synsets; fine-tune every block end to end on train100's 1000 images with
timm's training transform (random-resized crop, flip, colour jitter), AdamW (lr 5e-5,
weight decay 0.05, batch 50, 5 epochs, one warm-up epoch then cosine), seed 0.

Writes ``benchmarks/cache/teacher/deit_tiny_imagenette10_e2e.safetensors`` (+ ``.json``
with its 10-way top-1 on the first ``--per-class`` val images of each class) and reuses
them when present.

    .venv/bin/python benchmarks/make_teacher.py
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm.data  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, SYNSETS, TRAIN100  # noqa: E402
from sparseinv import load_model  # noqa: E402
from sparseinv.data import ImageFolder, read_class_index  # noqa: E402

TEACHER_DIR = CACHE / "teacher"
TEACHER_CKPT = TEACHER_DIR / "deit_tiny_imagenette10_e2e.safetensors"
EPOCHS, BATCH, LR, WD, SEED = 5, 50, 5e-5, 0.05, 0


def ten_way(labels: torch.Tensor, classes: list[str]) -> torch.Tensor:
    """1000-way ImageNet labels of the ten classes -> their 0..9 positions among ``classes``."""
    index = read_class_index(SYNSETS)
    rows = torch.tensor([index[c] for c in classes])
    return (labels.unsqueeze(1) == rows).float().argmax(1)


def train_batches(folder: ImageFolder, transform, generator: torch.Generator):
    order = torch.randperm(len(folder.files), generator=generator).tolist()
    for i in range(0, len(order), BATCH):
        idx = order[i : i + BATCH]
        images = torch.stack([transform(Image.open(folder.files[j]).convert("RGB")) for j in idx])
        yield images, torch.tensor([folder.labels[j] for j in idx])


def main(val: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Make (or reuse) the teacher; ``val``: (images, 1000-way labels) to report its 10-way top-1 on."""
    meta_path = TEACHER_CKPT.with_suffix(".json")
    if TEACHER_CKPT.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    TEACHER_DIR.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    start = time.time()
    train = ImageFolder.scan(TRAIN100)
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    rows = torch.tensor([read_class_index(SYNSETS)[c] for c in train.classes])
    # A 10-way head from the ImageNet rows of the same classes: a strong, honest start.
    weight, bias = model.head.weight.data[rows].clone(), model.head.bias.data[rows].clone()
    model.reset_classifier(len(train.classes))
    model.head.weight.data.copy_(weight)
    model.head.bias.data.copy_(bias)
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config, is_training=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    steps = EPOCHS * math.ceil(len(train.files) / BATCH)
    warmup = steps // EPOCHS
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        total, seen = 0.0, 0
        for images, labels in train_batches(train, transform, generator):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total, seen = total + loss.item() * len(labels), seen + len(labels)
        print(f"epoch {epoch + 1}/{EPOCHS}: train loss {total / seen:.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(TEACHER_CKPT),
              metadata={"model": DEIT_TINY, "num_classes": str(len(train.classes))})
    meta = {
        "model": DEIT_TINY,
        "checkpoint": str(TEACHER_CKPT),
        "num_classes": len(train.classes),
        "classes": train.classes,
        "recipe": {"trainable": "every block, end to end, from the ImageNet weights; 10-way head from the ImageNet rows",
                   "optimizer": "AdamW", "lr": LR, "weight_decay": WD, "epochs": EPOCHS, "batch_size": BATCH,
                   "schedule": "one warm-up epoch, then cosine", "seed": SEED,
                   "augmentation": "timm training transform (random-resized crop, flip, colour jitter)", "train": str(TRAIN100)},
        "seconds": time.time() - start,
    }
    if val is not None:
        with torch.no_grad():
            pred = torch.cat([model(val[0][i : i + 100]).argmax(1) for i in range(0, len(val[0]), 100)])
        meta["val_top1"] = 100.0 * float((pred == ten_way(val[1], train.classes)).float().mean())
        meta["val_images"] = len(val[1])
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"teacher: {meta.get('val_top1', float('nan')):.1f} 10-way top-1 | {meta['seconds']:.0f} s -> {TEACHER_CKPT}")
    return meta


if __name__ == "__main__":
    from quantization import val_subset

    main(val_subset(load_model(DEIT_TINY, DEIT_TINY_CKPT), 100))
