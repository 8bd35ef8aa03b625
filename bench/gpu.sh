#!/usr/bin/env bash
# GPU checks in one call (<= 8 minutes on one H200): CUDA tests, then the GPU benchmarks.
# Usage on a CUDA machine, from the repo root:  bash bench/gpu.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-${OUT:-bench/gpu-out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
if ! $PY -c "import hdlm" 2>/dev/null; then
  $PY -m pip install -q -e ".[data,eval,test]" 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1) tests that need CUDA (FlexAttention, cached sampling on GPU, float32 Gumbel at 50k classes), then the rest quickly
timeout 240 $PY -m pytest -q -x -m cuda tests 2>&1 | tee "$OUT/cuda-tests.log" | tail -5
# 2) training-step throughput of the efficient layout (bf16 autocast is not used here: fp32 like the CPU table)
timeout 120 $PY bench/bench_train.py --length 1024 --batch 8 --steps 5 --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log"
# 3) KV cache and the rho sweep
timeout 150 $PY bench/bench_sample.py --length 1024 --batch 8 --vocab 50257 --json "$OUT/sample.json" 2>&1 | tee "$OUT/sample.log"
