#!/usr/bin/env bash
# Issue 6's decode and baselines, and issue 9's server load, on a one-GPU host (fresh machine, ~70 GiB RAM free):
# the CUDA-graph decode tests, eager vs graph decode on the V2-Lite-shaped model, the server's load test, kt-kernel's
# MoE kernels and accelerate's expert offload. Each step has a time limit and writes its log to $OUT.
# Offline hosts: put the wheels in .wheels/ first (see README, "GPU-host benchmarks").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false
source benchmarks/steps.sh
install_wheels
{ nvidia-smi -L; nproc; free -g | head -2; } | tee "$OUT/machine.txt"
step pytest_graphs 90 python -m pytest -q -m gpu tests/test_decode_graph.py tests/test_chat.py -k "cuda"
step make 100 python benchmarks/v2lite.py make --dir /tmp/v2lite
step decode 100 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32
step adapter 40 python benchmarks/v2lite.py adapter --dir /tmp/v2lite
step serve 90 python benchmarks/serve_load.py --model /tmp/v2lite --device cuda --dtype bfloat16 \
  --adapter a=/tmp/v2lite/bench_adapter --clients 8 --requests 2 --max-tokens 16
step offload_chat 120 python benchmarks/offload_baseline.py chat --dir /tmp/v2lite --prompt-len 1024 --new-tokens 8
step ktkernel 150 python benchmarks/ktkernel_moe.py --phase-timeout 70 --decode-calls 200 --reps 3
