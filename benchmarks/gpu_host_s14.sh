#!/usr/bin/env bash
# Session 14 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: the kernel tests on the Xeon (the VNNI dots' permutation tables now built once) and the GPU decode tests
#           (the compiled stretches now compile one attention for every layer); the 4-bit kernel under a decode's
#           conditions (the whole model's working set, the GPU's gap between calls) at gpt-oss-120b's dims; then
#           V2-Lite int4 decode compiled in a fresh process (the first call's compile cost)
#   PART=b: AMX bf16 GEMMs for the CPU share of a streamed prefill (experts/amx.py): their tests on the Xeon's real
#           tiles and the split's tests (CPU and CUDA); the CPU part's maths per expert (oneDNN against AMX, prefetch
#           distances); V2-Lite bf16 1024-token prefill at CPU shares 0-0.4 side by side; the 4-bit kernel on
#           gpt-oss-120b's whole working set (the model's experts written from a random block: PART=a timed out
#           writing them with random_)
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
if [ "${PART}" = b ]; then
  step pytest_amx 150 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py tests/test_split_prefill.py
  step cpu_math 150 $NOW python benchmarks/split_cpu_math.py --experts 16 --tokens 96 --amx-prefetch 0 512 1024
  big prefill_bf16 200 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 0.2 0.3 0.4
  step conditions_gptoss 200 $NOW python benchmarks/kernel_conditions.py --format mxfp4 --hidden 2880 --inter 2880 \
    --topk 4 --layers 4 36 --experts 32 128 --gap-us 0 150 --calls 360
  bundle_logs
fi
#   PART=c: the AMX GEMM with each 32-row block of W copied into tile order first (PART=b: tiles loaded straight from
#           the rows ran at ~1.4 TFLOP/s, below oneDNN's ~1.9); tests on the real tiles, the per-expert maths at 64
#           experts (more than the L3 holds) and 15/16 threads, V2-Lite bf16 prefill at CPU shares side by side
if [ "${PART}" = c ]; then
  step pytest_amx 100 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py tests/test_split_prefill.py
  step cpu_math 120 $NOW python benchmarks/split_cpu_math.py --experts 64 --tokens 96 --amx-threads 0 15 --formats bf16 int8
  big prefill_bf16 200 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 0.2 0.3 0.4 0.5
  bundle_logs
fi
#   PART=d: the AMX GEMM alone against oneDNN (benchmarks/amx_gemm.py): from RAM (64 experts) and from cache (1), 32-256
#           tokens, with where a call's time goes (PART=c: both ~1.1 ms an expert at 96 tokens, ~1.5 TFLOP/s)
if [ "${PART}" = d ]; then
  step amx_gemm 150 $NOW sh -c 'python benchmarks/amx_gemm.py --experts 64; python benchmarks/amx_gemm.py --experts 1 --tokens 96 256'
  bundle_logs
fi
#   PART=e: the AMX GEMM reworked after PART=d's breakdown (per call at 96 tokens: 49 us packing the activations,
#           then per thread 90 us copying rows and 120 us in tiles, not overlapped): bf16 activations packed by a
#           blocked transposition, each thread's next block of rows prefetched into L2 during its tiles, bf16 output
#           written by the kernel; then the split's maths and V2-Lite bf16 prefill at CPU shares side by side
if [ "${PART}" = e ]; then
  step pytest_amx 100 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py tests/test_split_prefill.py
  step amx_gemm 100 $NOW python benchmarks/amx_gemm.py --experts 64 --tokens 32 96 256
  step cpu_math 100 $NOW python benchmarks/split_cpu_math.py --experts 64 --tokens 96 --amx-threads 0 --formats bf16
  big prefill_bf16 200 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 0.2 0.3 0.4
  bundle_logs
fi
#   PART=f: the AMX GEMM with B packed tile by tile (1 KiB contiguous tiles) and dynamic blocks with a look-ahead of
#           one; its prefetch variants (tiles two k-steps ahead to L1; the next block's rows to L2) against oneDNN in
#           one process; then V2-Lite bf16 prefill at CPU shares with the fastest variant at 96 tokens
if [ "${PART}" = f ]; then
  step pytest_amx 100 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py
  step amx_gemm 150 $NOW sh -c 'python benchmarks/amx_gemm.py --experts 64 --tokens 96 256 --variants 0 1 2 3;
    python benchmarks/amx_gemm.py --experts 1 --tokens 96 --variants 0 1'
  BEST=$(python - "$OUT/amx_gemm.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
amx = [r for r in rows if r["path"].startswith("amx") and r["tokens"] == 96 and r["experts"] == 64]
print(min(amx, key=lambda r: r["ms_per_expert"])["path"][5:] if amx else 0)
PY
)
  echo "best variant: $BEST" | tee -a "$OUT/summary.txt"
  HYBRIDMOE_AMX_VARIANT=$BEST big prefill_bf16 200 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 0.15 0.25
  bundle_logs
fi
#   PART=g: every CPU expert of a layer in one AMX call a projection (amx.grouped_linear; the split's bf16 math for
#           bf16 experts): tests, the GEMM per expert against grouped against oneDNN, the split's maths, then V2-Lite
#           bf16 prefill at CPU shares side by side (PART=f: share 0.15 2043-2053 tok/s against 1940 at 0)
if [ "${PART}" = g ]; then
  step pytest_amx 100 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py tests/test_split_prefill.py
  step amx_gemm 100 $NOW python benchmarks/amx_gemm.py --experts 64 --tokens 96 --variants 1 3
  step cpu_math 100 $NOW python benchmarks/split_cpu_math.py --experts 64 --tokens 96 --formats bf16
  HYBRIDMOE_AMX_VARIANT=1 big prefill_bf16 200 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 0.15 0.2 0.25 0.3
  bundle_logs
fi
#   PART=h: the final tree: the GPU tests of the split, streaming and backends; the AMX GEMM per expert against
#           grouped (16 experts a call, as the split) against oneDNN; then V2-Lite bf16 through hybridmoe.generate:
#           decode (the work split of session 13, end to end) and prefill at the default share against 0 and 0.25
if [ "${PART}" = h ]; then
  step pytest 200 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py tests/test_split_prefill.py \
    tests/test_streaming.py tests/test_expert_backends.py
  step amx_gemm 100 $NOW python benchmarks/amx_gemm.py --experts 64 --tokens 96 256 --variants 1
  big v2lite_bf16 220 v2-lite bfloat16 --steps 0 --skip train --cpu-shares 0 default 0.25
  bundle_logs
fi
#   PART=i: the split's CPU part without its dtype round trips (rows gathered and rounded while packing, fp32 GEMM
#           outputs through the gate): tests, then V2-Lite bf16 prefill at 0, the default and larger shares
if [ "${PART}" = i ]; then
  step pytest 150 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py tests/test_split_prefill.py
  big prefill_bf16 200 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 default 0.25 0.3 0.35
  bundle_logs
fi
#   PART=j: where a split prefill's time goes: one V2-Lite bf16 prompt at share 0 and at the default under
#           torch.profiler (trace_summary: the GPU's kernels, the copies, both, neither)
if [ "${PART}" = j ]; then
  big prefill_profile 200 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 default --profile-prefill
  bundle_logs
fi
#   PART=k: the split with more slots (S14-j's trace: the next layer's copy is queued when a layer's split starts, so
#           the copies run at most one layer ahead of the CPU part): V2-Lite bf16 prefill at 3 and 4 slots (each a
#           0.83 GiB slot at share 0.2), shares side by side
if [ "${PART}" = k ]; then
  big prefill_slots3 150 v2-lite bfloat16 --steps 0 --skip decode train --stream-slots 3 --cpu-shares 0 default 0.25 0.3
  big prefill_slots4 150 v2-lite bfloat16 --steps 0 --skip decode train --stream-slots 4 --cpu-shares 0 default 0.25 0.3
  bundle_logs
fi
