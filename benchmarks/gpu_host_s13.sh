#!/usr/bin/env bash
# Session 13 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: the 4-bit kernel's read rate taken apart: the dot products alone (dot_rate.c: one thread from cache = the
#           arithmetic's ceiling; every thread from RAM, each on its own long stream), then the whole kernel at
#           gpt-oss's and V2-Lite's dims with the OpenMP schedule (dynamic 2, guided, static) and rows per work item
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
if [ "${PART:-a}" = a ]; then
  cc -O3 -fopenmp benchmarks/dot_rate.c -o /tmp/dot_rate -lm
  step dot_rate_2880 120 sh -c '/tmp/dot_rate 16 2880 2 4096; /tmp/dot_rate 8 2880 2 4096; /tmp/dot_rate 16 2880 2 0'
  step dot_rate_2048 60 /tmp/dot_rate 16 2048 2 4096
  step gemv_gptoss 200 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 200 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4 --chunk 2 -1 0 --item-rows 16 32 64
  step gemv_v2lite 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 64 --calls 300 --threads 16 \
    --pages 2m --prefetch 4096 --chunk 2 -1 --item-rows 16 32 64
  bundle_logs
fi
#   PART=b: the 4-bit integer dots with AVX-512 VNNI (dot_qv4x4_512: 128 inputs a step, no per-group fold): their
#           tests on the Xeon, the dots alone (AVX-512 against AVX2: rates, and equal checksums), the whole kernel at
#           gpt-oss's and V2-Lite's dims
if [ "${PART}" = b ]; then
  step pytest_kernel 200 $NOW python -m pytest -q -p no:cacheprovider tests/test_int4_experts.py tests/test_cpu_kernel.py -x
  cc -O3 -fopenmp benchmarks/dot_rate.c -o /tmp/dot_rate -lm
  step dot_rate 150 sh -c 'for i in 2880 2048; do /tmp/dot_rate 16 $i 2 4096; /tmp/dot_rate 16 $i 1 4096; done'
  step gemv_gptoss 200 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 300 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4 --item-rows 16 64
  step gemv_v2lite 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 64 --calls 400 --threads 16 \
    --pages 2m --prefetch 4096 --item-rows 16 64
  bundle_logs
fi
#   PART=c: the activations' quantization storing four bytes at a time; the VNNI kernel's prefetch distance and its
#           work split (guided scheduling with 4-16 rows an item) at both dims; then V2-Lite int4 and gpt-oss-120b
#           MXFP4 decode end to end (default and compiled) on the VNNI kernel
if [ "${PART}" = c ]; then
  step gemv_gptoss 120 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 300 --threads 16 \
    --pages 2m --prefetch 4096 2048 8192 --topk 4 --hidden 2880 --inter 2880 --mxfp4 --chunk -1 --item-rows 4 8 16
  step gemv_v2lite 80 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 64 --calls 400 --threads 16 \
    --pages 2m --prefetch 4096 2048 8192 --chunk -1 --item-rows 4 8 16
  decode_of v2lite_int4 150 v2-lite int4 --compile-decode
  decode_of gptoss_mxfp4 200 gpt-oss-120b mxfp4 --compile-decode
  bundle_logs
fi
#   PART=d: the kernel's new default split (guided, 8-row items) and 4-bit scales on 2 MiB pages, end to end: V2-Lite
#           int4 and gpt-oss-120b MXFP4 decode, each against the old split (dynamic chunks of 2 x 16 rows, by
#           environment) in a process of its own on the same host
if [ "${PART}" = d ]; then
  OLD="env HYBRIDMOE_CPU_CHUNK=2 HYBRIDMOE_CPU_ITEM_ROWS=16"
  step v2lite_int4_old 100 $OLD $NOW python benchmarks/big_models.py --model v2-lite --format int4 --steps 0 --skip prefill train
  decode_of v2lite_int4 150 v2-lite int4 --compile-decode
  step gptoss_mxfp4_old 130 $OLD $NOW python benchmarks/big_models.py --model gpt-oss-120b --format mxfp4 --steps 0 --skip prefill train
  decode_of gptoss_mxfp4 200 gpt-oss-120b mxfp4 --compile-decode
  bundle_logs
fi
#   PART=e: inductor's compile workers stopped once the step has compiled (S13-d: the compiled gpt-oss run's kernel
#           was 4 ms slower a token than the eager one in the same process, its threads less busy); GPU tests of
#           decode; the kernel at both dims with the new default split on both instruction sets; then V2-Lite int4
#           and gpt-oss-120b decode, default and compiled
if [ "${PART}" = e ]; then
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py -k "compiled or share or static or int4"
  step gemv_gptoss 90 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 300 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4
  step gemv_v2lite 60 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 64 --calls 400 --threads 16 \
    --pages 2m --prefetch 4096
  decode_of v2lite_int4 100 v2-lite int4 --compile-decode
  decode_of gptoss_mxfp4 150 gpt-oss-120b mxfp4 --compile-decode
  bundle_logs
fi
#   PART=f: what compiling costs a returning user: V2-Lite int4 decode with the compiled stretches in two processes
#           one after the other (the second finds inductor's on-disk cache of the first); how much of the process's
#           memory is on huge pages (host_huge_gib)
if [ "${PART}" = f ]; then
  decode_of v2lite_int4_cold 100 v2-lite int4 --compile-decode
  decode_of v2lite_int4_warm 100 v2-lite int4 --compile-decode
  bundle_logs
fi
