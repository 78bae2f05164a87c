#!/usr/bin/env bash
# Session 12 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: where a graph-decoded token's time goes (decode_breakdown.py: launches, waits, GPU time in the graphs,
#           the GPU share's queueing, the CPU call and the kernel's own time) for V2-Lite int4 and bf16 and
#           gpt-oss-120b MXFP4, each at its default GPU share and others; the 4-bit kernel's dynamic chunk at
#           gpt-oss's dims
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
if [ "${PART:-a}" = a ]; then
  decode_of v2lite_int4 120 v2-lite int4 --gpu-shares 0 0.3333
  decode_of v2lite_bf16 150 v2-lite bfloat16 --gpu-shares 0.5
  decode_of gptoss_mxfp4 170 gpt-oss-120b mxfp4 --gpu-shares 0 0.5
  step gemv_gptoss_chunk 100 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 200 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4 --chunk 1 2 4
  bundle_logs
fi
#   PART=b: graph decode with the kernel's call prepared once per cut, the GPU share's weights copied by raw driver
#           copies, and the gated replay (graph i+1 queued behind cut i's host flag): the GPU tests of the decode
#           paths, then the same decode rows and breakdowns as PART=a (serial and gated replay alternated in-process)
if [ "${PART}" = b ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py \
    tests/test_batch_decode.py tests/test_fast_generate.py tests/test_mixed_adapters.py tests/test_chat.py
  decode_of v2lite_int4 120 v2-lite int4 --gpu-shares 0
  decode_of v2lite_bf16 150 v2-lite bfloat16
  decode_of gptoss_mxfp4 170 gpt-oss-120b mxfp4 --gpu-shares 0
  bundle_logs
fi
#   PART=c: 4-bit experts with no GPU share by default; the breakdown with the share's parts timed (its copies by
#           torch and by the driver) and the GPU kernels of one eager V2-Lite step
if [ "${PART}" = c ]; then
  step pytest_gpu 120 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py
  decode_of v2lite_int4 120 v2-lite int4 --kernel-profile
  decode_of v2lite_bf16 150 v2-lite bfloat16
  decode_of gptoss_mxfp4 150 gpt-oss-120b mxfp4 --kernel-profile
  bundle_logs
fi
#   PART=d: the gated replay and the raw driver copies removed (no gain in S12-b/c); the GPU stretches compiled
#           (settings.compile_decode): its GPU tests, then V2-Lite int4 and bf16 decode with and without it in one
#           process, and the kernels of one eager step each way
if [ "${PART}" = d ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py -k "compiled or share or static"
  decode_of v2lite_int4 300 v2-lite int4 --compile-decode --kernel-profile
  decode_of v2lite_bf16 240 v2-lite bfloat16 --compile-decode
  bundle_logs
fi
#   PART=e: the final code (the kernel's prepared call with its arguments packed in two arrays, the per-cut choice
#           made once): GPU tests of decode, generation and serving; V2-Lite int4 and gpt-oss-120b decode with and
#           without the compiled stretches; GLM-4.5-Air's training row with its projections dequantized in parts
if [ "${PART}" = e ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py \
    tests/test_batch_decode.py tests/test_fast_generate.py tests/test_cpu_kernel.py -x
  decode_of v2lite_int4 150 v2-lite int4 --compile-decode
  decode_of gptoss_mxfp4 200 gpt-oss-120b mxfp4 --compile-decode
  big glm_air_train 200 glm-4.5-air int4 --steps 3 \
    --skip decode prefill
  bundle_logs
fi
#   PART=f: a stretch that fails to compile runs eagerly where it failed (no retry of the step: S12-e's retry ran the
#           cache update twice): the GPU tests of decode, generation and the CPU kernel on the Xeon
if [ "${PART}" = f ]; then
  step pytest_gpu 240 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py \
    tests/test_batch_decode.py tests/test_fast_generate.py
  step pytest_kernel 150 $NOW python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py
  bundle_logs
fi
#   PART=g: big_models.py builds with hybridmoe.load's attention choice (no cuDNN attention; until now the benchmark
#           kept it): V2-Lite int4 and bf16 decode with and without the compiled stretches, and the eager step's kernels
if [ "${PART}" = g ]; then
  decode_of v2lite_int4 150 v2-lite int4 --compile-decode --kernel-profile
  decode_of v2lite_bf16 150 v2-lite bfloat16 --compile-decode
  bundle_logs
fi
