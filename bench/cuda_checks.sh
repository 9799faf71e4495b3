#!/usr/bin/env bash
# The checks that need a CUDA card, in one run (about 8 minutes on an H100; a lent machine's
# 15 minutes of device time hold it once): the `gpu`-marked tests, an out-of-memory back-off on
# a real allocator, bench_cuda.py's prediction against the card, batchfit's own search on the
# card, the plan-advice bench on the card, and a plan and planned run of the cnn example. Run
# from the repository root on a machine whose python3 has torch with CUDA, transformers,
# scikit-learn, rich and matplotlib; batchfit is used from src/ (no install). Logs go to
# ${OUT:-cuda-out} (eight files at most).
#
# CHECKS picks the steps (default: all of tests oom search predict advice plan more; `more` is
# the plan-advice bench of charlm and unet, after the rest). DEADLINE (seconds, default 560)
# bounds the whole run: each step's own limit is cut to what is left, and a step with under
# 20 s left is skipped, so the logs of the steps before it come back. ADVICE_ARGS (e.g.
# "--sized") is passed to both plan-advice steps, ADVICE_EXAMPLES (default "cnn digits cancer")
# and MORE_EXAMPLES (default "charlm unet") name their tasks.
set -u
OUT=${OUT:-cuda-out}
CHECKS=${CHECKS:-tests oom search predict advice plan more}
DEADLINE=${DEADLINE:-560}
ADVICE_ARGS=${ADVICE_ARGS:-}
ADVICE_EXAMPLES=${ADVICE_EXAMPLES:-cnn digits cancer}
MORE_EXAMPLES=${MORE_EXAMPLES:-charlm unet}
mkdir -p "$OUT"
want() { case " $CHECKS " in *" $1 "*) ;; *) return 1 ;; esac
    left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then echo "== $1 skipped: ${left} s left"; return 1; fi; }
limit() { left=$((DEADLINE - SECONDS - 5)); [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, torch.cuda.get_device_name(0), torch.cuda.mem_get_info())"

if want tests; then
echo "== gpu-marked tests"
timeout $(limit 120) python3 -m pytest -p no:cacheprovider -o addopts="" -m gpu -rA -s -q \
    tests/test_cuda.py tests/memory/test_gpu_prediction.py tests/integrations/test_transformers_cuda.py \
    >"$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"
grep -E "passed|failed|^E " "$OUT/gpu_tests.log" | tail -12
fi

if want oom; then
echo "== out-of-memory back-off on the card (unet, 150 MiB cap)"
timeout $(limit 60) python3 -m batchfit train --example unet --device cuda --global-batch 64 \
    --micro-batch 64 --memory-budget 150MiB --steps 6 --out /tmp/oom --force \
    >"$OUT/oom.log" 2>&1
echo "train exit $?"
grep -E "out of memory|global batch|Error|error" "$OUT/oom.log" | head -6
fi

if want search; then
echo "== batchfit's own search on the card (resnet50, no budget: its free memory)"
timeout $(limit 60) python3 -m batchfit memory bench/scale_tasks.py:resnet50 --device cuda --json \
    >"$OUT/memory_resnet50.json" 2>/dev/null
echo "memory exit $?"
python3 -c "import json; d=json.load(open('$OUT/memory_resnet50.json')); \
print({k: d[k] for k in ('batch_size', 'basis', 'real_steps', 'oom_errors', 'seconds')}, \
[(t['batch_size'], t['fits']) for t in d['trials']])"
fi

if want predict; then
echo "== predicted memory against the card"
timeout $(limit 170) python3 bench/bench_cuda.py measure --seconds 150 --search none \
    --out "$OUT/cuda.json" 2>&1 | tee "$OUT/cuda.log" | grep -v "^[a-z0-9_]*: {"
fi

if want advice; then
echo "== plan advice on the card ($ADVICE_EXAMPLES)"
timeout $(limit 200) python3 bench/bench_advice.py --examples $ADVICE_EXAMPLES --device cuda $ADVICE_ARGS \
    --json "$OUT/advice.json" >"$OUT/advice.log" 2>&1
echo "advice exit $?"
grep -E "^(wall|grid steps|plan:)" "$OUT/advice.log"
fi

if want plan; then
echo "== plan and planned run of the cnn example on the card"
{
    timeout $(limit 60) python3 -m batchfit plan --example cnn --device cuda --out /tmp/plan --force
    echo "plan exit $?"
    timeout $(limit 40) python3 -m batchfit train --plan /tmp/plan/plan.json --device cuda \
        --out /tmp/run --force
    echo "train exit $?"
} >"$OUT/plan_train.log" 2>&1
grep -E "exit|Trained|global batch|^  lr|val_" "$OUT/plan_train.log" | head -12

fi

if want more; then
echo "== plan advice on the card ($MORE_EXAMPLES)"
timeout $(limit 400) python3 bench/bench_advice.py --examples $MORE_EXAMPLES --device cuda $ADVICE_ARGS \
    --json "$OUT/advice_more.json" >"$OUT/advice_more.log" 2>&1
echo "advice exit $?"
grep -E "^(wall|grid steps|plan:)" "$OUT/advice_more.log"
fi
echo "== done in ${SECONDS} s"
