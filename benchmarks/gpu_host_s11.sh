#!/usr/bin/env bash
# Session 11 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: the GPU tests of the Dequantized parts (the Triton kernel reading a row slice in place), then where the
#           4-bit CPU kernel's time goes at GLM-4.5-Air's and gpt-oss's dims (decode_gemv.py: the kernel's own split
#           of a call, 16 and 8 threads, 2 MiB pages, prefetch off and 4 KiB ahead), then gpt-oss-120b (MXFP4, all
#           layers: decode, prefill, training with the trainer's chunked loss; the peaks with the parts)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
# gemv NAME [flags]: decode_gemv.py with the kernel's memory settings compared at 16 and 8 threads
gemv() {
  local name=$1
  shift
  step "$name" 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 200 --threads 16 8 \
    --pages 2m --prefetch 0 4096 "$@"
}
if [ "${PART:-a}" = a ]; then
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_dequant_gpu.py \
    tests/test_int4_experts.py tests/test_int8_experts.py tests/test_streaming.py
  gemv gemv_glm --topk 8 --hidden 4096 --inter 1408
  gemv gemv_gptoss --topk 4 --hidden 2880 --inter 2880 --mxfp4
  big gptoss_mxfp4 240 gpt-oss-120b mxfp4 --steps 3
  bundle_logs
fi
#   PART=b: after the 4-bit dots' prefetch walks each four-row tile linearly and the activations' quantization is
#           vectorized: the kernels at both models' dims (16 threads, 2 MiB pages, prefetch 4 and 8 KiB ahead), then
#           decode (and prefill) of GLM-4.5-Air int4, gpt-oss-120b MXFP4 and V2-Lite int4, built in place
if [ "${PART}" = b ]; then
  step gemv_glm 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 200 --threads 16 \
    --pages 2m --prefetch 4096 8192 --topk 8 --hidden 4096 --inter 1408
  step gemv_gptoss 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 200 --threads 16 \
    --pages 2m --prefetch 4096 8192 --topk 4 --hidden 2880 --inter 2880 --mxfp4
  big glm_air_int4 150 glm-4.5-air int4 --steps 0 \
    --skip prefill train
  big gptoss_mxfp4 150 gpt-oss-120b mxfp4 --steps 0 \
    --skip train
  big v2lite_int4 150 v2-lite int4 --steps 0 --skip train
  bundle_logs
fi
#   PART=c: the CPU kernel's tests on the Xeon (AVX-512 and AVX2: the linear tile prefetch, the vectorized
#           activation quantization, NaN inputs), then the kernels at both models' dims against the host's read
#           bandwidth measured both ways (torch's sum and the kernel library's own read loop)
if [ "${PART}" = c ]; then
  step pytest_kernel 150 $NOW python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_int4_experts.py
  step gemv_gptoss 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 200 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4
  step gemv_glm 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 200 --threads 16 \
    --pages 2m --prefetch 4096 --topk 8 --hidden 4096 --inter 1408
  bundle_logs
fi
#   PART=d: the final kernel (int4 on AVX2 integer dots everywhere, the four rows' sums folded before scaling): its
#           tests on the Xeon, gpt-oss's dims against the host's read bandwidth, GLM-4.5-Air's decode
if [ "${PART}" = d ]; then
  step pytest_kernel 120 $NOW python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_int4_experts.py
  step gemv_gptoss 120 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 200 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4
  big glm_air_int4 110 glm-4.5-air int4 --steps 0 \
    --skip prefill train
  bundle_logs
fi
