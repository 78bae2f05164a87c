#!/usr/bin/env bash
# Issue 8 and 9 on a 2-GPU host (fresh machine, ~70 GiB RAM free, ~35 GB /tmp): 1- vs 2-GPU V2-Lite-shaped training,
# the server's load test on the V2-Lite-shaped model, and the 2-GPU tests. Each step has a time limit and writes its
# log to $OUT. Offline hosts: put the serve wheels in .wheels/ first (see README, "GPU-host benchmarks").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-15}
source benchmarks/steps.sh
install_wheels
{ nvidia-smi -L; nproc; free -g | head -2; df -h /dev/shm | tail -1; } | tee "$OUT/machine.txt"
step make 120 python benchmarks/v2lite.py make --dir /tmp/v2lite
step train1 110 python benchmarks/v2lite.py train --dir /tmp/v2lite --steps "$STEPS" --batch 4 --seq 1024 --log-every 5
step train2 150 python benchmarks/v2lite.py train --dir /tmp/v2lite --steps "$STEPS" --batch 4 --seq 1024 --log-every 5 \
  --nproc 2
step adapter 50 python benchmarks/v2lite.py adapter --dir /tmp/v2lite
step serve 120 env CUDA_VISIBLE_DEVICES=0 python benchmarks/serve_load.py --model /tmp/v2lite --device cuda \
  --dtype bfloat16 --adapter a=/tmp/v2lite/bench_adapter --adapter b=/tmp/v2lite/bench_adapter --clients 16 \
  --requests 2 --max-tokens 32
step pytest_dist 100 python -m pytest -q -m gpu tests/test_distributed.py
