#!/usr/bin/env bash
# int8 experts against bf16 on a one-GPU host (fresh machine, ~70 GiB RAM free): the GPU tests of graph decode and
# int8, the decode-size GEMV strategies, and V2-Lite-shaped decode and training with bf16 and int8 experts side by side.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; } | tee "$OUT/machine.txt"
step pytest_gpu 120 python -m pytest -q -m gpu tests/test_decode_graph.py tests/test_int8_experts.py
step make 100 python benchmarks/v2lite.py make --dir /tmp/v2lite
step gemv 120 python benchmarks/decode_gemv.py --threads 8 16
step decode_bf16 80 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32
step decode_int8 80 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --expert-dtype int8
step train_bf16 110 python benchmarks/v2lite.py train --dir /tmp/v2lite --steps 15 --batch 4 --seq 1024 --log-every 5
step train_int8 110 python benchmarks/v2lite.py train --dir /tmp/v2lite --steps 15 --batch 4 --seq 1024 --log-every 5 \
  --expert-dtype int8
