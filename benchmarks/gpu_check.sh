#!/usr/bin/env bash
# Every GPU check in one script, for a machine with an NVIDIA GPU and a few minutes:
# the CUDA tests (every command with --device cuda), the host-sync and device-placement
# tests, then the GPU benchmarks (sparse vs dense speed, eager and as CUDA graphs; a whole
# pool end to end, eager and with --cuda-graphs).
#
#   bash benchmarks/gpu_check.sh prepare   # here, beside ../shared: copies the weights, the
#                                          # test vectors and 20 val images per class into
#                                          # .device-shared/ (git-ignored, ~27 MiB)
#   bash benchmarks/gpu_check.sh run [tests] [speed] [pool] [pool-graphs]
#                                          # there, from the repository root, with .device-shared
#                                          # carried along; torch and timm already installed. All
#                                          # four stages by default (estimated at about 12 minutes on one H200 at
#                                          # ITERATIONS=400, not yet timed); name stages to split them across calls
#                                          # kept under a command's 10-minute limit, e.g. "tests speed", then
#                                          # "pool-graphs" (the pool as the fast path makes it), then "pool".
#
# Results land in benchmarks/results/*_cuda.{json,md} and, when $OUT is set, are copied there
# with the test log.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    src=${SHARED:-../shared}
    dst=.device-shared
    rm -rf "$dst" && mkdir -p "$dst/assets" "$dst/testvectors" "$dst/data/imagenette/val"
    cp "$src"/assets/* "$dst/assets/" && cp "$src"/testvectors/* "$dst/testvectors/"
    for class in "$src"/data/imagenette/val/*/; do
        name=$(basename "$class")
        mkdir -p "$dst/data/imagenette/val/$name"
        ls "$class" | sort | head -n 20 | while read -r f; do cp "$class/$f" "$dst/data/imagenette/val/$name/"; done
    done
    du -sh "$dst"
    ;;
run)
    shift
    stages=${*:-tests speed pool pool-graphs}
    export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SHARED=${SHARED:-$PWD/.device-shared}
    log=${OUT:-benchmarks/results}/gpu_check.log
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
    python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$log"
    for stage in $stages; do
        case $stage in
        tests) python3 -m pytest -q -rs tests/test_cuda.py tests/test_host_syncs.py tests/test_device_placement.py tests/test_devices.py 2>&1 | tail -n 30 | tee -a "$log" ;;
        speed) python3 benchmarks/inversion_speed.py --device cuda --iterations "${ITERATIONS:-400}" --models tiny base 2>&1 | grep -v 'it/s\|s/it' | tee -a "$log" ;;
        pool) python3 benchmarks/pool_speed.py --device cuda --num-images 8192 --batch-size 1024 --iterations 400 --precision bf16 --no-serial 2>&1 | grep -v 'it/s\|s/it' | tee -a "$log" ;;
        pool-graphs) python3 benchmarks/pool_speed.py --device cuda --num-images 8192 --batch-size 1024 --iterations 400 --precision bf16 --no-serial --cuda-graphs 2>&1 | grep -v 'it/s\|s/it' | tee -a "$log" ;;
        *) echo "unknown stage '$stage': use tests, speed, pool or pool-graphs" >&2; exit 2 ;;
        esac
    done
    if [ -n "${OUT:-}" ]; then cp benchmarks/results/*_cuda.* "$OUT/" 2>/dev/null; fi
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
