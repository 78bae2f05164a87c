#!/usr/bin/env bash
# Batch-1 decode with a GPU share of the routed experts (one-GPU host, fresh machine): the GPU tests of graph decode
# (now with the share), int8 and chat, then V2-Lite-shaped decode with shares 0, 1/6, 1/3, 1/2 side by side, bf16 and
# int8 experts.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; git log --oneline -1; } > "$OUT/machine.txt" 2>&1
step pytest_gpu 240 python -m pytest -q -m gpu tests/test_decode_graph.py tests/test_int8_experts.py tests/test_chat.py
step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step decode_bf16 200 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --gpu-share 0 0.1667 0.3333 0.5
step decode_int8 200 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --expert-dtype int8 --gpu-share 0 0.1667 0.3333
