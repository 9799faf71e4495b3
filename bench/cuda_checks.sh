#!/usr/bin/env bash
# The checks that need a CUDA card, in one run (about 6 minutes on an H100): the `gpu`-marked
# tests, bench_cuda.py's prediction against the card, a plan and a planned run of the cnn
# example on the card, and an out-of-memory back-off on a real allocator. Run from the
# repository root on a machine whose python3 has torch with CUDA, transformers, scikit-learn,
# rich and matplotlib; batchfit is used from src/ (no install). Logs go to ${OUT:-cuda-out}.
set -u
OUT=${OUT:-cuda-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, torch.cuda.get_device_name(0), torch.cuda.mem_get_info())"

echo "== gpu-marked tests"
timeout 120 python3 -m pytest -p no:cacheprovider -o addopts="" -m gpu -rA -s -q \
    tests/test_cuda.py tests/memory/test_gpu_prediction.py >"$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"
grep -E "passed|failed|error|^(mlp|bn-convnet|sdpa-decoder) " "$OUT/gpu_tests.log" | tail -20

echo "== out-of-memory back-off on the card (unet, 150 MiB cap)"
timeout 60 python3 -m batchfit train --example unet --device cuda --global-batch 64 \
    --micro-batch 64 --memory-budget 150MiB --steps 6 --out /tmp/oom --force \
    >"$OUT/oom.log" 2>&1
echo "train exit $?"
grep -E "out of memory|global batch|micro-batch|Error|error" "$OUT/oom.log" | head -8

echo "== predicted memory against the card"
timeout 200 python3 bench/bench_cuda.py measure --seconds 180 --out "$OUT/cuda.json" \
    2>&1 | tee "$OUT/cuda.log" | grep -v "^{"

echo "== plan and planned run of the cnn example on the card"
timeout 100 python3 -m batchfit plan --example cnn --device cuda --out /tmp/plan --force \
    >"$OUT/plan.log" 2>&1
echo "plan exit $?"
cp /tmp/plan/plan.json "$OUT/plan_cnn.json" 2>/dev/null
timeout 80 python3 -m batchfit train --plan /tmp/plan/plan.json --device cuda --out /tmp/run \
    --force >"$OUT/train.log" 2>&1
echo "train exit $?"
tail -c 1500 "$OUT/plan.log" | head -c 1500
