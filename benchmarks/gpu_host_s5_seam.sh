#!/usr/bin/env bash
# Session 5, issue 15 ("one seam"): issue 6's numbers re-measured in one run, this tree beside the commit before the
# seam work (99a8977), on one V2-Lite-shaped checkpoint. The old tree is exported by the caller into .before/
# (`mkdir -p .before && git archive 99a8977 src benchmarks | tar -x -C .before`, carried to the host).
#   PART=a: the GPU tests, then batch-1 decode (bf16, 1024-token prompt, 32 tokens, 2 replays) after/before
#   PART=b: training (4 x 1024, LoRA r=8 everywhere, 12 steps) and 1024-token prefill (2 slots) after/before
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
install_wheels
{ nvidia-smi -L; nproc; } > "$OUT/machine.txt" 2>&1
NOW="env PYTHONPATH=$PWD/src:${PYTHONPATH:-}"
OLD="env PYTHONPATH=$PWD/.before/src:${PYTHONPATH:-}"
if [ "${PART:-a}" = a ]; then
  step pytest_gpu 330 $NOW python -m pytest -q -m gpu -x --ignore=tests/test_distributed.py
  step make 150 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  step decode_after 100 $NOW python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 --repeats 2
  step decode_before 100 $OLD python .before/benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 --repeats 2
else
  step make 150 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  step train_after 130 $NOW python benchmarks/v2lite.py train --dir /tmp/v2lite --steps 12 --batch 4 --seq 1024 --log-every 4
  step train_before 130 $OLD python .before/benchmarks/v2lite.py train --dir /tmp/v2lite --steps 12 --batch 4 --seq 1024 --log-every 4
  step prefill_after 60 $NOW python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 --stream-slots 2
  step prefill_before 60 $OLD python .before/benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 --stream-slots 2
fi
