#!/usr/bin/env bash
# The compiled CPU expert kernel on a one-GPU host (fresh machine): its tests with each instruction set of the Xeon,
# the GPU tests of graph decode and int8 (which now run the kernel between the graphs), the decode-size GEMV
# strategies at 8 and 16 threads, and V2-Lite-shaped batch-1 decode (torch loop vs kernel, bf16 and int8 experts)
# with a breakdown of where a graph-decoded token's time goes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
{ nvidia-smi -L; nproc; lscpu | grep -E 'Model name|^CPU\(s\)|Thread|NUMA|L3'; grep -o -m1 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u
  command -v cc && cc --version | head -1; git log --oneline -1; } > "$OUT/machine.txt" 2>&1
# A host without a C compiler uses the library built on the development machine (carried in .wheels/).
command -v cc >/dev/null || export HYBRIDMOE_CPU_KERNEL_LIB=$PWD/.wheels/moe_cpu.so
step kernel_tests 150 python -m pytest -q tests/test_cpu_kernel.py
step pytest_gpu 180 python -m pytest -q -m gpu tests/test_decode_graph.py tests/test_int8_experts.py
step gemv 150 python benchmarks/decode_gemv.py --threads 8 16 --calls 200
step make 150 python benchmarks/v2lite.py make --dir /tmp/v2lite
step decode_bf16 150 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32
step decode_int8 150 python benchmarks/v2lite.py decode --dir /tmp/v2lite --prompt-len 1024 --new-tokens 32 \
  --expert-dtype int8
