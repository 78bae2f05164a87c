#!/usr/bin/env bash
# Session 8 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: a lone server request on CUDA graphs (the GPU serve test, issue 18's table with per-token timing), then
#           where the server's batched step loses 2.6x against the engine alone (S7): py-spy over the server's threads
#           under 16 clients, and the same load with a 0.2 ms GIL switch interval against Python's 5 ms
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
LOAD16="python benchmarks/serve_load.py --model /tmp/v2lite --device cuda --dtype bfloat16 --resident-expert-layers 26
  --clients 16 --requests 1 --max-tokens 64"
ADAPTER="--adapter a=/tmp/v2lite/bench_adapter"
# the V2-Lite-shaped checkpoint (once per host) and its random adapter on every target
v2lite_and_adapter() {
  [ -d /tmp/v2lite ] || step make 70 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  step adapter "${1:-80}" $NOW python benchmarks/v2lite.py adapter --dir /tmp/v2lite
}
# issue_table NAME SECONDS RESIDENT [serve_load flags]: issue 18's table, per-token timing
issue_table() {
  local name=$1 limit=$2 resident=$3
  shift 3
  step "$name" "$limit" $NOW python benchmarks/serve_load.py --model /tmp/v2lite --device cuda --dtype bfloat16 \
    --resident-expert-layers "$resident" --issue-table --token-timing "$@"
}
if [ "${PART:-a}" = a ]; then
  step pytest_gpu_serve 80 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_serve.py -k cuda_greedy &
  [ -d /tmp/v2lite ] || step make 70 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  wait
  issue_table serve_solo_graphs 130 26
  step serve_pyspy 150 $NOW /tmp/pydeps/bin/py-spy record --threads --idle --rate 50 --format raw \
    -o "$OUT/serve_pyspy.txt" -- $LOAD16
  step serve_switch_5ms 80 $NOW $LOAD16
  step serve_switch_02ms 80 $NOW $LOAD16 --switch-interval 0.0002
fi
#   PART=b: the batched CUDA-graph decoder (hybridmoe.batch_decode): its GPU tests, then issue 18's table with every
#           layer resident and with none, half the clients on an adapter with LoRA on every target (experts included)
if [ "${PART}" = b ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_batch_decode.py \
    tests/test_decode_graph.py tests/test_serve.py tests/test_serve_solo.py tests/test_mixed_adapters.py &
  v2lite_and_adapter
  wait
  for r in ${RESIDENT:-26 0}; do
    issue_table serve_batch_graphs_r$r 150 $r $ADAPTER
  done
fi
#   PART=c: after the fixes of S8-b (the graphs' output copied, warm-up at startup): the batch decoder's GPU test,
#           where a batched prefill's time goes, issue 18's table (adapter "a": LoRA on every target) in-process and
#           through `hybridmoe serve` as users start it, and base-only
if [ "${PART}" = c ]; then
  step pytest_gpu 120 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_batch_decode.py tests/test_serve.py &
  v2lite_and_adapter
  wait
  step prefill_profile 90 $NOW python benchmarks/serve_profile.py --model /tmp/v2lite \
    --adapter /tmp/v2lite/bench_adapter --resident 26 --prefill
  issue_table serve_r26_adapter 120 26 $ADAPTER
  issue_table serve_r26_base_cli 150 26 --serve-cli
fi
#   PART=d: issue 18's table after the warm-up covers adapters and greedy logprob rows are batched: every layer
#           resident in-process and through `hybridmoe serve`, and none resident (the 6 GiB-class setting)
if [ "${PART}" = d ]; then
  step pytest_gpu 120 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_batch_decode.py tests/test_serve.py &
  v2lite_and_adapter
  wait
  issue_table serve_r26_adapter 120 26 $ADAPTER
  issue_table serve_r26_adapter_cli 150 26 $ADAPTER --serve-cli
  issue_table serve_r0_adapter 150 0 $ADAPTER
fi
#   PART=e: the batched GPU share (decode_graph._BatchShare), experts in host RAM (0 resident), base only: its GPU
#           tests, then issue 18's table with the default share (1/3 for bf16) against none, in one run
if [ "${PART}" = e ]; then
  step pytest_gpu 120 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_batch_decode.py \
    tests/test_decode_graph.py &
  [ -d /tmp/v2lite ] || step make 70 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
  wait
  for share in ${SHARES:-0.3333 0}; do
    issue_table serve_r0_share_$share 130 0 --decode-gpu-share $share
  done
fi
#   PART=f: the whole GPU test suite on the final code, then issue 18's table through `hybridmoe serve` (every layer
#           resident, half on the adapter) with `hybridmoe chat -v`'s decode speed now leaving out its one-time setup
if [ "${PART}" = f ]; then
  v2lite_and_adapter &
  step pytest_gpu_all 290 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests
  wait
  issue_table serve_r26_adapter_cli 110 26 $ADAPTER --serve-cli
fi
#   PART=g: after batch-1 decoders were keyed by the LoRA that runs and kept per adapter (warm-up captures each):
#           their GPU tests, then issue 18's table through `hybridmoe serve`, every layer resident and none
if [ "${PART}" = g ]; then
  v2lite_and_adapter 60 &
  step pytest_gpu 90 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py \
    tests/test_batch_decode.py tests/test_serve.py tests/test_serve_solo.py
  wait
  issue_table serve_r26_adapter_cli 100 26 $ADAPTER --serve-cli
  # experts in host RAM: the batched GPU share now takes the rows with routed-expert LoRA too (S8-d: 49.9 tok/s)
  issue_table serve_r0_adapter_cli 170 0 $ADAPTER --serve-cli
fi
