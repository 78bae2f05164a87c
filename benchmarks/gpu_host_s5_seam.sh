#!/usr/bin/env bash
# Session 5, issue 15 ("one seam"): issue 6's numbers re-measured in one run, this tree beside the commit before the
# seam work (99a8977), on one V2-Lite-shaped checkpoint. The old tree is exported by the caller into .before/
# (`mkdir -p .before && git archive 99a8977 src benchmarks | tar -x -C .before`, carried to the host).
#   PART=perf: batch-1 decode (bf16, 1024-token prompt, 32 tokens), training (4 x 1024, LoRA r=8 everywhere,
#              10 steps) and 1024-token prefill (2 slots), after/before
#   PART=tests: the README's Python example (v2lite.py api), decode before/after in the other order, then
#               pytest -m gpu (the 2-GPU tests need a 2-GPU host)
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
install_wheels
{ nvidia-smi -L; nproc; } > "$OUT/machine.txt" 2>&1
NOW="env PYTHONPATH=$PWD/src:${PYTHONPATH:-}"
OLD="env PYTHONPATH=$PWD/.before/src:${PYTHONPATH:-}"
if [ "${PART:-perf}" = perf ]; then
  step make 150 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  step decode_after 80 $NOW python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32
  step decode_before 80 $OLD python .before/benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32
  step train_before 100 $OLD python .before/benchmarks/v2lite.py train --dir /tmp/v2lite --steps 10 --batch 4 --seq 1024 --log-every 5
  step train_after 100 $NOW python benchmarks/v2lite.py train --dir /tmp/v2lite --steps 10 --batch 4 --seq 1024 --log-every 5
  step prefill_after 45 $NOW python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 --stream-slots 2
  step prefill_before 45 $OLD python .before/benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 --stream-slots 2
else  # PART=tests: the README example as users call it, then the GPU tests (run S5-2 also measured decode in the
      # other order: decode_before2 / decode_after2, the lines below it in the history of this file)
  step make 150 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  step api 100 $NOW python benchmarks/v2lite.py api --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32
  rm -rf /tmp/v2lite
  step pytest_gpu 400 $NOW python -m pytest -q -m gpu -p no:cacheprovider --ignore=tests/test_distributed.py
fi
