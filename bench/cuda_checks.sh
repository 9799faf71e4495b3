#!/usr/bin/env bash
# The checks that need a CUDA card, in one run (about 8 minutes on an H100; a lent machine's
# 15 minutes of device time hold it once): the `gpu`-marked tests, an out-of-memory back-off on
# a real allocator, bench_cuda.py's prediction against the card, batchfit's own search on the
# card, the plan-advice bench on the card, and a plan and planned run of the cnn example. Run
# from the repository root on a machine whose python3 has torch with CUDA, transformers,
# scikit-learn, rich and matplotlib; batchfit is used from src/ (no install). Logs go to
# ${OUT:-cuda-out} (eight files at most).
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
grep -E "passed|failed|^E " "$OUT/gpu_tests.log" | tail -12

echo "== out-of-memory back-off on the card (unet, 150 MiB cap)"
timeout 60 python3 -m batchfit train --example unet --device cuda --global-batch 64 \
    --micro-batch 64 --memory-budget 150MiB --steps 6 --out /tmp/oom --force \
    >"$OUT/oom.log" 2>&1
echo "train exit $?"
grep -E "out of memory|global batch|Error|error" "$OUT/oom.log" | head -6

echo "== batchfit's own search on the card (resnet50, no budget: its free memory)"
timeout 60 python3 -m batchfit memory bench/scale_tasks.py:resnet50 --device cuda --json \
    >"$OUT/memory_resnet50.json" 2>/dev/null
echo "memory exit $?"
python3 -c "import json; d=json.load(open('$OUT/memory_resnet50.json')); \
print({k: d[k] for k in ('batch_size', 'basis', 'real_steps', 'oom_errors', 'seconds')}, \
[(t['batch_size'], t['fits']) for t in d['trials']])"

echo "== predicted memory against the card"
timeout 170 python3 bench/bench_cuda.py measure --seconds 150 --search none \
    --out "$OUT/cuda.json" 2>&1 | tee "$OUT/cuda.log" | grep -v "^[a-z0-9_]*: {"

echo "== plan advice on the card (cnn, digits, cancer)"
timeout 200 python3 bench/bench_advice.py --examples cnn digits cancer --device cuda \
    --json "$OUT/advice.json" >"$OUT/advice.log" 2>/dev/null
echo "advice exit $?"
grep -E "^(wall|grid steps|plan:)" "$OUT/advice.log"

echo "== plan and planned run of the cnn example on the card"
{
    timeout 60 python3 -m batchfit plan --example cnn --device cuda --out /tmp/plan --force
    echo "plan exit $?"
    timeout 40 python3 -m batchfit train --plan /tmp/plan/plan.json --device cuda \
        --out /tmp/run --force
    echo "train exit $?"
} >"$OUT/plan_train.log" 2>&1
grep -E "exit|Trained|global batch|^  lr|val_" "$OUT/plan_train.log" | head -12
