#!/usr/bin/env bash
# Prefill of a 1024-token prompt against the number of GPU slots of expert weights (one-GPU host, fresh machine):
# inference keeps the first slots-2 layers resident between prompts. bf16 and int8 experts.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; } > "$OUT/machine.txt" 2>&1
step streaming_tests 120 python -m pytest -q tests/test_streaming.py
step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step prefill_bf16 200 python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 --stream-slots 2 8 14 20 26
step prefill_int8 200 python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 --stream-slots 2 8 14 \
  --expert-dtype int8
