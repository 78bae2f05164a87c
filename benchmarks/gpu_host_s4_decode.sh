#!/usr/bin/env bash
# Session 4's final decode measurements on a one-GPU host (fresh machine): the kernel's tests on the Xeon, the GEMV
# memory settings and the kernel-vs-torch crossover in tokens per call, then V2-Lite-shaped decode with GPU shares
# 0, 1/6, 1/3 (3 replay runs each), bf16 and int8 experts. Leaves /tmp/v2lite for gpu_host_s4_baselines.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; free -g | head -2; git log --oneline -1; } > "$OUT/machine.txt" 2>&1
step kernel_tests 120 python -m pytest -q tests/test_cpu_kernel.py
step gemv 150 python benchmarks/decode_gemv.py --threads 16 --calls 200 --pages 4k 2m --prefetch 4096 8192 \
  --batch-tokens 1 4 16 32 64 128
step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step decode_bf16 150 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --gpu-share 0 0.1667 0.3333 --repeats 3
step decode_int8 150 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --expert-dtype int8 --gpu-share 0 0.1667 0.3333 --repeats 3
