#!/usr/bin/env bash
# Session 4's closing check on a one-GPU host (fresh machine): every GPU test, the kernel's tests on the Xeon, and
# V2-Lite-shaped bf16 and int8 decode with the final defaults (3 replay runs each).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; } > "$OUT/machine.txt" 2>&1
step pytest_gpu 300 python -m pytest -q -m gpu
step kernel_tests 120 python -m pytest -q tests/test_cpu_kernel.py
step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step decode_bf16 120 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 --repeats 3
step decode_int8 120 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --expert-dtype int8 --repeats 3
