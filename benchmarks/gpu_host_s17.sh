#!/usr/bin/env bash
# Session 17 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: what session 16 changed after its last GPU run: the AVX2 MXFP4 dot's offset table (bit for bit the old
#           outputs on the EPYC): the CPU kernel's and 4-bit tests on the Xeon (its AVX2 rest after the VNNI steps and
#           the AVX2 instruction set), dot_rate at ISA 1 (S16-a: mxfp4g32 10.9 GB/s from cache), the kernel alone at
#           gpt-oss's dims (S16-f: MXFP4 AVX2 66.7 GB/s of its own time, int4 90.6), then gpt-oss-120b decode;
#           and the GPU tests of the second reading's mends (decode_norm.unavailable, planned_slot_bytes)
#   PART=b: graph gates (hybridmoe.graph_gate: graph i+1 launched while graph i runs, waiting on the GPU for the
#           CPU's experts): their GPU tests and the decode tests around them, then gpt-oss-120b MXFP4 and V2-Lite int4
#           decode with gates and without, alternating in one process (--gates-ab; S17-a: gpt-oss 31.8 tok/s,
#           launches 1.41 ms a token)
#   PART=c: the fused norms' output dtype (gpt-oss keeps its norms' weights in fp32: bf16 decode on CUDA had crashed
#           at the first attention) and StaticDecoder.reset in inference mode: the GPU tests again; then PART=b's A/B
#           in the other order (gates off first), V2-Lite first
#   PART=d: where the ~20 µs a layer between the cut's CPU call and the kernel's own time go (decode_gemv --prepared:
#           graph decode's prepared call alone, 16 threads), and the compiled GPU stretches with gates (compile_decode
#           had cut the GPU's wait by ~1.2 ms a token, S16-d, with no gain while each launch came after the experts)
#   PART=e: the kernel's per-call buffers from a per-thread arena (S17-d: the prepared call cost 13-25 µs beyond the
#           kernel's timed part at 16 threads, 3 µs on 2 cores): the kernel's tests on the Xeon, then decode_gemv
#           --prepared and V2-Lite int4 decode, this kernel first, then the one before (.wheels/moe_cpu_s17d.c)
#   PART=f (commit 133eb25, reverted): non-temporal prefetches of the weight stream, decode_gemv --nta
#   PART=g (commit bde0db5, reverted): graph gates with a batch-1 GPU share (its copies and graph on a side stream):
#           the gate and decode-graph GPU tests, then V2-Lite bf16 decode with gates and without, alternating
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
if [ "${PART:-a}" = a ]; then
  step pytest_cpu 150 $NOW python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_int4_experts.py \
    tests/test_formats.py -x
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_norm.py \
    tests/test_decode_graph.py tests/test_streaming.py tests/test_split_prefill.py tests/test_memory.py
  step dot_rate 90 bash -c "cc -O3 -fopenmp benchmarks/dot_rate.c -o /tmp/dot_rate -lm && /tmp/dot_rate 16 2880 1"
  step gemv_gptoss 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 300 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4
  decode_of gpt_oss 110 gpt-oss-120b mxfp4
  bundle_logs
fi
if [ "${PART:-a}" = b ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_graph_gate.py \
    tests/test_decode_graph.py tests/test_decode_norm.py tests/test_batch_decode.py tests/test_fast_generate.py
  decode_of gpt_oss_gates 200 gpt-oss-120b mxfp4 --gates-ab
  decode_of v2lite_int4_gates 150 v2-lite int4 --gates-ab
  bundle_logs
fi
if [ "${PART:-a}" = c ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_graph_gate.py \
    tests/test_decode_norm.py tests/test_decode_graph.py
  decode_of v2lite_int4_gates 150 v2-lite int4 --gates-ab --gates-first off
  decode_of gpt_oss_gates 200 gpt-oss-120b mxfp4 --gates-ab --gates-first off
  bundle_logs
fi
if [ "${PART:-a}" = d ]; then
  step gemv_gptoss 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 300 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4 --prepared
  decode_of gpt_oss_compiled 200 gpt-oss-120b mxfp4 --compile-decode
  decode_of v2lite_int4_compiled 150 v2-lite int4 --compile-decode
  bundle_logs
fi
if [ "${PART:-a}" = e ]; then
  build_kernel_lib .wheels/moe_cpu_s17d.c /tmp/moe_cpu_old.so
  step pytest_cpu 120 $NOW python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_int4_experts.py \
    -k "kernel or e8m0 or arena or reused" -x
  GEMV="python benchmarks/decode_gemv.py --layers 2 --experts 16 --calls 300 --threads 16 --pages 2m --prefetch 4096 \
    --topk 4 --hidden 2880 --inter 2880 --mxfp4 --prepared"
  step gemv_new 90 $NOW $GEMV
  HYBRIDMOE_CPU_KERNEL_LIB=/tmp/moe_cpu_old.so step gemv_old 90 $NOW $GEMV
  decode_of v2lite_int4_new 100 v2-lite int4
  HYBRIDMOE_CPU_KERNEL_LIB=/tmp/moe_cpu_old.so decode_of v2lite_int4_old 100 v2-lite int4
  bundle_logs
fi
