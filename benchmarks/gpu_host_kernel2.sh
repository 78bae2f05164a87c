#!/usr/bin/env bash
# Second run for the CPU expert kernel (one-GPU host, fresh machine): its tests on the Xeon, the memory settings of
# the decode kernel (2 MiB pages, software prefetch distance) side by side, then V2-Lite-shaped decode with the best
# distance, and training with bf16 vs int8 experts.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag
  git log --oneline -1; } > "$OUT/machine.txt" 2>&1
step kernel_tests 150 python -m pytest -q tests/test_cpu_kernel.py
step gemv 200 python benchmarks/decode_gemv.py --threads 16 --calls 200 --pages 4k 2m --prefetch 0 512 1024 2048 4096
export HYBRIDMOE_CPU_PREFETCH=$(python - "$OUT/gemv.log" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
best = min((r for r in runs if r["strategy"].startswith("kernel_bf16_avx512_bf16_2m")), key=lambda r: r["ms_per_layer"],
           default={"strategy": "_pf1024"})
print(best["strategy"].rsplit("_pf", 1)[1])
PY
)
echo "HYBRIDMOE_CPU_PREFETCH=$HYBRIDMOE_CPU_PREFETCH" | tee -a "$OUT/summary.txt"
step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step decode_bf16 150 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32
step decode_int8 150 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --expert-dtype int8
