#!/usr/bin/env bash
# Decode A/B on a one-GPU host: this tree against an older copy of src/ (OLD_SRC, e.g. `git archive <commit> src`),
# side by side on one machine, then a profile of the graph decode and accelerate-offload training.
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
OLD_SRC=${OLD_SRC:-bench_old/src}
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; } | tee "$OUT/machine.txt"
step make 100 env PYTHONPATH=src python benchmarks/v2lite.py make --dir /tmp/v2lite
step decode_new 70 env PYTHONPATH=src python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32
step decode_old 70 env PYTHONPATH=$OLD_SRC python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 \
  --new-tokens 32
step profile 60 env PYTHONPATH=src python benchmarks/v2lite.py profile_decode --dir /tmp/v2lite --new-tokens 12
step offload_train 85 env PYTHONPATH=src python benchmarks/offload_baseline.py train --dir /tmp/v2lite --steps 4 \
  --batch 1 --seq 256 --targets auto --max-seconds 35
