#!/usr/bin/env bash
# Session 16 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: what session 15 changed after its last GPU run: the split's weighted sum by token in one parallel C pass
#           (amx.scatter_rows; its tests and benchmarks/split_tail.py at 16 threads), info's and the estimate's split
#           slots (the CPU tests on the Xeon, the GPU equivalence, split, streaming, decode-graph and norm tests on
#           the GPU: issue 20's last condition); then V2-Lite bf16 prefills at the default 2 slots, shares 0, the
#           default (0.25) and 0.3, with the CPU part's seconds beside the AMX GEMMs' (S15-h: ~3 ms a layer outside
#           them); the AVX2 int4 dot's flat
#           group-64 loop on the Xeon (dot_rate at ISA 1, against S13-b's 15.6 GB/s from cache, 95.5 from RAM)
#   PART=b: gpt-oss-120b MXFP4 decode (S15-d: 26-32 tok/s; the kernel's threads busy 0.82-0.88 of its regions): the
#           GPU share of each token's experts (1 of 4 on the GPU, S12-b: a loss then) beside none, in one process; then
#           OpenMP's threads spinning through the GPU's gaps (OMP_WAIT_POLICY=active) in a second process
#   PART=c: MXFP4 scales kept as the shipped e8m0 bytes (one a 32 weights, not a bf16 value): every GPU test, the
#           4-bit kernel's and formats' tests on the Xeon (AVX-512 VNNI dots on e8m0 rows), then gpt-oss-120b decode
#           with e8m0 scales and, in a second process on the same host, with bf16 ones (--mxfp4-bf16-scales)
#   PART=d: where gpt-oss-120b's ~5.6 ms a token of GPU time goes (the kernels of one eager step), and the compiled
#           stretches (compile_decode) beside the default, one process, e8m0 scales
#   PART=e: the CPU kernel alone on the Xeon at every instruction set (decode_gemv.py: AVX-512 and AVX2 against the
#           host's read probes; S13-c/e measured AVX2 int4 at 0.70-0.74 of them, before the flat group-64 AVX2 loop
#           and the e8m0 scales), gpt-oss's dims (MXFP4 and int4) and V2-Lite's
#   PART=f: PART=e again with the kernel's own rate printed (kernel_GBps: its bytes over its own time; S16-e's GB/s
#           counted ~0.1-0.15 ms a call of the script's Python), then V2-Lite int4 decode (issue 16's >= 70) on this
#           session's code
#   PART=g: region 2 of the CPU kernel as (expert, block of rows) items into per-slot outputs, then a weighted sum
#           (bit for bit the old sums), against the kernel before it (.wheels/moe_cpu_s16f.c, built here and loaded
#           through HYBRIDMOE_CPU_KERNEL_LIB): decode_gemv at V2-Lite's dims, then V2-Lite int4 decode, each both ways
#           (the old source: git show bff7f0d:src/hybridmoe/experts/moe_cpu.c > .wheels/moe_cpu_s16f.c; the new one
#           was dfc6487's, reverted in 0d479a5 after PART=h)
#   PART=h: PART=g's decode in the other order (the new kernel first), against a drift between processes
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
if [ "${PART:-a}" = a ]; then
  step pytest_cpu 200 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py tests/test_split_prefill.py \
    tests/test_streaming.py tests/test_memory.py tests/test_cpu_kernel.py tests/test_int4_experts.py -x
  step pytest_gpu 300 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_norm.py \
    tests/test_equivalence.py tests/test_split_prefill.py tests/test_streaming.py tests/test_decode_graph.py
  step split_tail 60 $NOW python benchmarks/split_tail.py --repeats 3
  step dot_rate 90 bash -c "cc -O3 -fopenmp benchmarks/dot_rate.c -o /tmp/dot_rate -lm && /tmp/dot_rate 16 2048 1"
  big prefill_bf16 100 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 default 0.3
  bundle_logs
fi
if [ "${PART:-a}" = b ]; then
  decode_of gpt_oss 240 gpt-oss-120b mxfp4 --gpu-shares 0.25 0
  OMP_WAIT_POLICY=active decode_of gpt_oss_active 200 gpt-oss-120b mxfp4
  bundle_logs
fi
if [ "${PART:-a}" = c ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests
  step pytest_cpu 120 $NOW python -m pytest -q -p no:cacheprovider tests/test_int4_experts.py \
    tests/test_cpu_kernel.py tests/test_formats.py tests/test_dequant_gpu.py -x
  decode_of gpt_oss_e8m0 110 gpt-oss-120b mxfp4
  decode_of gpt_oss_bf16 110 gpt-oss-120b mxfp4 --mxfp4-bf16-scales
  bundle_logs
fi
if [ "${PART:-a}" = d ]; then
  decode_of gpt_oss 300 gpt-oss-120b mxfp4 --kernel-profile --compile-decode
  bundle_logs
fi
# the CPU kernel alone at gpt-oss's and V2-Lite's dims, every instruction set (PART=e, f)
gemv_dims() {
  step gemv_gptoss 150 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --calls 300 --threads 16 \
    --pages 2m --prefetch 4096 --topk 4 --hidden 2880 --inter 2880 --mxfp4
  step gemv_v2lite 100 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 64 --calls 400 --threads 16 \
    --pages 2m --prefetch 4096
}
if [ "${PART:-a}" = e ]; then
  gemv_dims
  bundle_logs
fi
if [ "${PART:-a}" = f ]; then
  gemv_dims
  decode_of v2lite_int4 120 v2-lite int4
  bundle_logs
fi
if [ "${PART:-a}" = g ]; then
  cc -O3 -fPIC -fopenmp -I src/hybridmoe/experts -c .wheels/moe_cpu_s16f.c -o /tmp/old.o \
    && cc -shared /tmp/old.o -o /tmp/moe_cpu_old.so -lm
  GEMV="python benchmarks/decode_gemv.py --layers 4 --experts 64 --calls 400 --threads 16 --pages 2m --prefetch 4096"
  step gemv_new 90 $NOW $GEMV
  HYBRIDMOE_CPU_KERNEL_LIB=/tmp/moe_cpu_old.so step gemv_old 90 $NOW $GEMV
  HYBRIDMOE_CPU_KERNEL_LIB=/tmp/moe_cpu_old.so decode_of v2lite_int4_old 100 v2-lite int4
  decode_of v2lite_int4_new 100 v2-lite int4
  bundle_logs
fi
if [ "${PART:-a}" = h ]; then
  cc -O3 -fPIC -fopenmp -I src/hybridmoe/experts -c .wheels/moe_cpu_s16f.c -o /tmp/old.o \
    && cc -shared /tmp/old.o -o /tmp/moe_cpu_old.so -lm
  decode_of v2lite_int4_new 100 v2-lite int4
  HYBRIDMOE_CPU_KERNEL_LIB=/tmp/moe_cpu_old.so decode_of v2lite_int4_old 100 v2-lite int4
  bundle_logs
fi
