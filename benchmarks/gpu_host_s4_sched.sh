#!/usr/bin/env bash
# The CPU kernel's OpenMP scheduling, static vs dynamic (chunks of 2 work items), on a one-GPU host (fresh machine):
# the GEMV microbenchmark, then V2-Lite-shaped bf16 decode alternated A B A B (GPU share 1/3, 3 replay runs each),
# then int8 decode with the defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; git log --oneline -1; } > "$OUT/machine.txt" 2>&1
step gemv 120 python benchmarks/decode_gemv.py --threads 16 --calls 300 --pages 2m --prefetch 4096 --chunk 0 2 8
step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
for run in 1 2; do
  for chunk in 0 2; do
    export HYBRIDMOE_CPU_CHUNK=$chunk
    step decode_bf16_chunk${chunk}_$run 120 python benchmarks/v2lite.py decode \
      --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 --gpu-share 0.3333 --repeats 3
  done
done
unset HYBRIDMOE_CPU_CHUNK
step decode_int8 120 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --expert-dtype int8 --repeats 3
