#!/usr/bin/env bash
# Session 14 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: the kernel tests on the Xeon (the VNNI dots' permutation tables now built once) and the GPU decode tests
#           (the compiled stretches now compile one attention for every layer); the 4-bit kernel under a decode's
#           conditions (the whole model's working set, the GPU's gap between calls) at gpt-oss-120b's dims; then
#           V2-Lite int4 decode compiled in a fresh process (the first call's compile cost)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
if [ "${PART:-a}" = a ]; then
  step pytest_kernel 150 $NOW python -m pytest -q -p no:cacheprovider tests/test_int4_experts.py tests/test_cpu_kernel.py -x
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py
  step conditions_gptoss 200 $NOW python benchmarks/kernel_conditions.py --format mxfp4 --hidden 2880 --inter 2880 \
    --topk 4 --layers 4 36 --experts 32 128 --gap-us 0 150 --calls 360
  decode_of v2lite_int4_compiled 120 v2-lite int4 --compile-decode
  bundle_logs
fi
