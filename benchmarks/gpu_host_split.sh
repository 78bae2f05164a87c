#!/usr/bin/env bash
# Prefill past PCIe (issue 20): a CPU share of each layer's routed experts computed while the rest stream to the GPU
# (one-GPU host, fresh machine). The GPU tests of the split and of the streamed path, the CPU part's two maths per
# expert format on this host's CPU, then V2-Lite-shaped 1024-token prefills at shares 0, 0.15, 0.25, 0.35 side by side,
# bf16 and int8 experts, at the default 2 slots (and bf16 at 14, where resident layers are not split).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; lscpu | grep -i 'model name'; git log --oneline -1; } > "$OUT/machine.txt" 2>&1
step pytest_gpu 240 python -m pytest -q -m gpu tests/test_split_prefill.py tests/test_expert_backends.py tests/test_streaming.py
step cpu_math 240 python benchmarks/split_cpu_math.py --experts 16 --tokens 96
step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step prefill_bf16 300 python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 \
  --cpu-share 0 0.15 0.25 0.35
step prefill_int8 300 python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 --expert-dtype int8 \
  --cpu-share 0 0.1 0.15 0.25
step prefill_bf16_14 300 python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 --stream-slots 14 \
  --cpu-share 0 0.15 0.25
