#!/usr/bin/env bash
# Training at issue 6's setting with bf16 and int8 routed experts, side by side (one-GPU host; run after a script
# that wrote /tmp/v2lite on the same machine, or it writes it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
[ -f /tmp/v2lite/config.json ] || step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step train_bf16 200 python benchmarks/v2lite.py train --dir /tmp/v2lite --steps 15 --batch 4 --seq 1024 --log-every 5
step train_int8 200 python benchmarks/v2lite.py train --dir /tmp/v2lite --steps 15 --batch 4 --seq 1024 \
  --log-every 5 --expert-dtype int8
