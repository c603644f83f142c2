#!/usr/bin/env bash
# `make demo`: the main job end to end on the real DeiT-Tiny, on CPU, in a few minutes.
#   1. invert the 10 Imagenette classes densely and sparsely, and print both timings;
#   2. quantize DeiT-Tiny to W8/A8 and W4/A4 from the sparse pool with the default method
#      (every matrix-product input quantized, RepQ-style quantizers, block reconstruction);
#   3. distill a student (frozen DeiT-Tiny backbone, fresh head) from the sparse pool;
#   4. print each model's accuracy on real Imagenette images next to full precision.
# Scaled down for a demo: 10 images, 200 steps (stops at 2/5/10/15, the paper's
# schedule scaled by 200/4000), accuracy on the first 20 validation images of each class.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-demo_out}
MODEL=deit_tiny_patch16_224
CKPT=$SHARED/assets/deit_tiny_patch16_224.safetensors
VAL=$SHARED/data/imagenette/val
INDEX=$SHARED/assets/imagenet_synsets.txt
# The ImageNet indices of the 10 Imagenette classes (tench, springer, cassette player,
# chain saw, church, French horn, garbage truck, gas pump, golf ball, parachute).
CLASSES="0 217 482 491 497 566 569 571 574 701"
COMMON="--model $MODEL --checkpoint $CKPT --num-images 10 --batch-size 10 --iterations 200 --classes $CLASSES --quiet"
EVAL="--model $MODEL --checkpoint $CKPT --data $VAL --class-index $INDEX --limit-per-class 20 --quiet"
mkdir -p "$OUT"

echo "== 1. inversion (dense, then sparse) =="
$BIN/sparseinv invert $COMMON --out "$OUT/dense"
$BIN/sparseinv invert $COMMON --out "$OUT/sparse" --prune-at 2 5 10 15 --prune-ratio 0.3 0.3 0.3 0.3

echo "== 2. data-free quantization from the sparse pool =="
$BIN/sparseinv evaluate $EVAL --json "$OUT/fp32.json"
for bits in "8 8" "4 4"; do
  set -- $bits
  $BIN/sparseinv quantize --model $MODEL --checkpoint "$CKPT" --calib "$OUT/sparse" --w-bits $1 --a-bits $2 \
      --out "$OUT/w$1a$2.safetensors" --quiet
  $BIN/sparseinv evaluate $EVAL --quantized "$OUT/w$1a$2.safetensors" --json "$OUT/w$1a$2.json"
done

echo "== 3. data-free knowledge transfer from the sparse pool =="
# A fresh 1000-way head on 10 images: many cheap epochs (features are computed once).
# Started afresh each time: a leftover checkpoint of other settings would be refused.
rm -f "$OUT"/student.*
$BIN/sparseinv distill --teacher "$MODEL:$CKPT" --student "$MODEL:$CKPT" --pool "$OUT/sparse" \
    --epochs 200 --batch-size 10 --lr 0.1 --out "$OUT/student.safetensors" --quiet
$BIN/sparseinv evaluate --model $MODEL --checkpoint "$OUT/student.safetensors" --data $VAL --class-index $INDEX \
    --limit-per-class 20 --quiet --json "$OUT/student_eval.json"

echo "== summary =="
$BIN/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
dense, sparse = (json.loads((out / k / "run.json").read_text()) for k in ("dense", "sparse"))
print(f"inversion, 10 images x 200 steps: dense {dense['wall_seconds']:.1f} s, sparse {sparse['wall_seconds']:.1f} s "
      f"({dense['wall_seconds'] / sparse['wall_seconds']:.2f}x faster); success rate dense {dense['success_rate']:.2f}, sparse {sparse['success_rate']:.2f}")
print("top-1 on the first 20 real validation images of each Imagenette class (1000-way):")
for name in ("fp32", "w8a8", "w4a4"):
    print(f"  {name:5s} {json.loads((out / f'{name}.json').read_text())['top1']:.1f}%")
student = json.loads((out / "student_eval.json").read_text())
print(f"  student (frozen DeiT-Tiny backbone, fresh head distilled from 10 sparse images): {student['top1']:.1f}%")
PY
