#!/usr/bin/env bash
# Session 7 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: the CPU kernel's AVX-512 paths (CPU tests on the Xeon), GPU tests incl. resident expert layers; V2-Lite
#           decode with 0 / 8 / 14 / 26 resident layers (bf16 and int4)
#   PART=b: issue 18's serving load table on V2-Lite, every layer's experts resident against none (bf16)
#   PART=c: the server's batched decode step timed and profiled (benchmarks/serve_profile.py)
#   PART=d: the CPU share of streamed prefill; PART=e: a lone request on CUDA graphs in the server (not run yet)
#   PART=f: py-spy over the server under load (its engine thread against serve_profile.py's; not run yet)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
if [ "${PART:-a}" = a ]; then
  step cpu_tests_avx512 120 $NOW python -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_cpu_kernel.py \
    tests/test_int4_experts.py tests/test_expert_backends.py -x
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py \
    tests/test_streaming.py tests/test_int4_experts.py tests/test_mixed_adapters.py tests/test_int8_experts.py
  for f in bfloat16 int4; do
    step decode_resident_$f 100 $NOW python benchmarks/big_models.py --model v2-lite --format $f --steps 0 \
      --skip prefill --decode-prompt 1024 --new-tokens 32 --resident-layers 8 14 26
  done
elif [ "${PART}" = b ]; then  # issue 18's table, bf16 experts: all 26 MoE layers resident against none, in one run
  [ -d /tmp/v2lite/bench_adapter ] || { step make 170 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite;
    step adapter 60 $NOW python benchmarks/v2lite.py adapter --dir /tmp/v2lite; }
  for r in ${RESIDENT:-26 0}; do
    step serve_resident_$r 200 $NOW python benchmarks/serve_load.py --model /tmp/v2lite \
      --adapter a=/tmp/v2lite/bench_adapter --device cuda --dtype bfloat16 --resident-expert-layers $r --issue-table
  done
fi
if [ "${PART}" = c ]; then  # where a server decode step's time goes (resident layers: every expert on the GPU)
  [ -d /tmp/v2lite/bench_adapter ] || { step make 170 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite;
    step adapter 60 $NOW python benchmarks/v2lite.py adapter --dir /tmp/v2lite; }
  step serve_profile_r26 200 $NOW python benchmarks/serve_profile.py --model /tmp/v2lite \
    --adapter /tmp/v2lite/bench_adapter --resident 26
  step serve_profile_r0 120 $NOW python benchmarks/serve_profile.py --model /tmp/v2lite \
    --adapter /tmp/v2lite/bench_adapter --resident 0 --no-profile --steps 4
fi
if [ "${PART}" = d ]; then  # the CPU share of streamed prefills (stream_cpu_share), merged with resident layers
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_split_prefill.py \
    tests/test_streaming.py tests/test_decode_graph.py -k "split or resident or share or Split"
  [ -d /tmp/v2lite ] || step make 150 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  step prefill_bf16 170 $NOW python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 \
    --cpu-share 0 0.15 0.25 0.35
  step prefill_int8 120 $NOW python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024 \
    --expert-dtype int8 --cpu-share 0 0.1 0.2
fi
if [ "${PART}" = e ]; then  # a lone request on the static-cache decoder (CUDA graphs) in the server; the GPU serve test
  step pytest_gpu_serve 80 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_serve.py \
    -k cuda_greedy &
  [ -d /tmp/v2lite ] || step make 70 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  wait
  step serve_solo_graphs 110 $NOW python benchmarks/serve_load.py --model /tmp/v2lite --device cuda \
    --dtype bfloat16 --resident-expert-layers 26 --issue-table --token-timing
  step serve_cli 200 $NOW python benchmarks/serve_load.py --model /tmp/v2lite --device cuda --dtype bfloat16 \
    --resident-expert-layers 26 --issue-table --token-timing --serve-cli
fi
if [ "${PART}" = f ]; then  # where the server's decode step loses 2.6x against the engine alone (S7-e/f): py-spy on it
  [ -d /tmp/v2lite ] || step make 70 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  step serve_pyspy 200 $NOW /tmp/pydeps/bin/py-spy record --threads --native --rate 100 --format speedscope \
    -o "$OUT/serve.speedscope" -- python benchmarks/serve_load.py --model /tmp/v2lite --device cuda \
    --dtype bfloat16 --resident-expert-layers 26 --clients 16 --requests 1 --max-tokens 64
fi
