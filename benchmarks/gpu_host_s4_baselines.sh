#!/usr/bin/env bash
# Session 4's baselines on the same one-GPU host, after gpu_host_s4_decode.sh: the server load test (its batched
# decode now runs the CPU kernel) and kt-kernel's MoE kernels against hybridmoe's CPU path (now the kernel for
# decode). Offline hosts: the wheels in .wheels/ (README, "Development").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
install_wheels
[ -f /tmp/v2lite/config.json ] || step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step adapter 60 python benchmarks/v2lite.py adapter --dir /tmp/v2lite
step serve 150 python benchmarks/serve_load.py --model /tmp/v2lite --device cuda --dtype bfloat16 \
  --adapter a=/tmp/v2lite/bench_adapter --clients 8 --requests 2 --max-tokens 16
step ktkernel 200 python benchmarks/ktkernel_moe.py --phase-timeout 90 --decode-calls 200 --reps 3
