#!/usr/bin/env bash
# GPU checks in one call (<= 8 minutes on one H200): CUDA tests, then the GPU benchmarks (issue #16.5).
# Usage on a CUDA machine, from the repo root:  bash bench/gpu.sh [--dry-run] [OUT_DIR]
#   1. the CUDA tests (FlexAttention, cached sampling on GPU, float32 Gumbel at 50k classes)
#   2. bench/bench_gpu.py: training step, efficient layout vs one interval at ω = d/4, d/16 with FlexAttention
#      block-sparse training masks, fp32 and bf16 autocast, torch.compile; tokens/s and MFU vs the bf16 peak
#   3. bench/bench_train.py: the fp32 table of bench/RESULTS.md (4 x 256, GPT-2 vocabulary, d = 1024)
#   4. bench/bench_sample.py: KV-cache speed-up, cached == uncached tokens (asserted), the ρ sweep
# --dry-run: every step at tiny sizes on the CPU (no install, no nvidia-smi), so the script cannot fail on
# first contact with a GPU; tests/test_gpu_script.py runs it.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-${OUT:-bench/gpu-out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
FAIL=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  if [ $rc -ne 0 ]; then echo "!! $name failed (exit $rc)"; FAIL=1; fi
}
if [ $DRY = 1 ]; then
  step cuda-tests 120 $PY -m pytest -q -x -m cuda -p no:cacheprovider tests/test_samplers.py tests/test_generate.py
  step gpu-train 120 $PY bench/bench_gpu.py --dry-run --json "$OUT/gpu-train.json"
  step train 120 $PY bench/bench_train.py --device cpu --length 32 --batch 1 --steps 1 --layers 1 --hidden 32 \
    --vocab 97 --json "$OUT/train.json"
  step sample 120 $PY bench/bench_sample.py --device cpu --length 16 --rho-length 16 --vocab 64 --layers 1 \
    --hidden 32 --batch 1 --json "$OUT/sample.json"
else
  if ! $PY -c "import hdlm" 2>/dev/null; then
    $PY -m pip install -q -e ".[data,eval,test]" 2>&1 | tail -2
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
  step cuda-tests 150 $PY -m pytest -q -x -m cuda -p no:cacheprovider tests
  step gpu-train 170 $PY bench/bench_gpu.py --length 1024 --batch 8 --compile --json "$OUT/gpu-train.json"
  step train 60 $PY bench/bench_train.py --length 1024 --batch 8 --steps 5 --json "$OUT/train.json"
  step sample 90 $PY bench/bench_sample.py --length 1024 --batch 8 --vocab 50257 --json "$OUT/sample.json"
fi
echo "outputs in $OUT"
exit $FAIL
