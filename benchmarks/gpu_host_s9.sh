#!/usr/bin/env bash
# Session 9 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: where a training step's time goes (issue 20): the trainer's step profiled (phases with syncs, then one
#           step's chrome trace summarized by trace_summary.py: kernels vs host->device copies vs an idle GPU), bf16
#           and int8 experts, batch 4 x 1024, LoRA r=8 on every target; then the trainer itself (`train`) for its tok/s
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
# serve_table NAME: issue 18's table through `hybridmoe serve`, every layer resident, half of the clients on the adapter
serve_table() {
  step "$1" 100 $NOW python benchmarks/serve_load.py --model /tmp/v2lite --device cuda --dtype bfloat16 \
    --resident-expert-layers 26 --issue-table --token-timing --adapter a=/tmp/v2lite/bench_adapter --serve-cli
}
adapter() {
  step adapter 60 $NOW python benchmarks/v2lite.py adapter --dir /tmp/v2lite
}
if [ "${PART:-a}" = a ]; then
  make_v2lite
  profile_steps
  trainer train_bf16 100 12 1
fi
#   PART=b: why the server's prefills of the issue-18 table take 0.4 s a batch (S9-g: TTFT p50 2.15 s; the engine
#           alone: 0.1 s): SDPA's first call per new shape by backend (cuDNN builds a plan per shape), then the table
#           through `hybridmoe serve` as is and with cuDNN attention off (a sitecustomize in that process tree)
if [ "${PART}" = b ]; then
  step sdpa_shapes 60 $NOW python benchmarks/sdpa_shapes.py &
  make_v2lite
  wait
  adapter
  serve_table serve_r26_adapter_cli
  mkdir -p /tmp/nocudnn
  echo "import torch; torch.backends.cuda.enable_cudnn_sdp(False)" > /tmp/nocudnn/sitecustomize.py
  NOW="env PYTHONPATH=/tmp/nocudnn:$PWD/src:${PYTHONPATH:-}" serve_table serve_r26_adapter_cli_nocudnn
fi
#   PART=c: after the fixes of S9-a/b (each expert layer's LoRA factors copied before the next layer's prefetch and
#           reused by its backward; CPU gradient norms by rows; cuDNN attention off once a model is on the GPU): the
#           trainer's step profiled again (bf16, int8), the trainer itself, the GPU tests of the touched code, and
#           issue 18's table through `hybridmoe serve`
if [ "${PART}" = c ]; then
  make_v2lite
  profile_steps
  trainer train_bf16 100 12 1
  step pytest_gpu 120 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_streaming.py tests/test_train.py \
    tests/test_int8_experts.py tests/test_split_prefill.py tests/test_serve.py
  adapter
  serve_table serve_r26_adapter_cli
fi
#   PART=d: the final code for issue 20's training rows (int8 dequantized in one pass; the backward's LoRA factors
#           saved like activations, so the peak is back under 6 GiB): the trainer's step profiled (bf16, int8), the
#           trainer as `hybridmoe train` runs it (logging every 10 steps, as the example YAMLs), prefill of 1024
#           tokens, and the GPU tests of the touched code. Logs and traces come back as one archive.
if [ "${PART}" = d ]; then
  make_v2lite
  profile_steps
  trainer train_bf16 100 31 10
  trainer train_int8 120 31 10 --expert-dtype int8
  step prefill_bf16 90 $NOW python benchmarks/v2lite.py prefill --dir /tmp/v2lite --prompt-len 1024
  step pytest_gpu 120 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_streaming.py tests/test_train.py \
    tests/test_int8_experts.py tests/test_split_prefill.py
  bundle_logs
fi
#   PART=e: after the staged expert-LoRA gradients are added to .grad during the backward (as their copies finish)
#           instead of all at its end: the trainer (bf16; int8 last), and the GPU tests that stage gradients
if [ "${PART}" = e ]; then
  make_v2lite
  trainer train_bf16 100 31 10
  step pytest_gpu 90 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_equivalence.py tests/test_train.py \
    tests/test_streaming.py tests/test_int8_experts.py
  trainer train_int8 110 31 10 --expert-dtype int8
  bundle_logs
fi
#   PART=f (not run in session 9: no device time left): the README's Python example as written
#           (benchmarks/readme_example.py: hybridmoe.load with the adapter, model.generate, hybridmoe.generate, and
#           hybridmoe.train from examples/deepseek_v2_lite_lora.yaml for 31 steps), on V2-Lite; then issue 20's int4
#           training row (the trainer, and the step profiled), not measured since the copies overlap the compute
if [ "${PART}" = f ]; then
  make_v2lite
  adapter
  $NOW python -c "import sys; sys.path.insert(0, 'benchmarks'); import v2lite; v2lite.write_bench_data('/tmp/v2lite', 1024)"
  step readme_example 200 $NOW python benchmarks/readme_example.py --model /tmp/v2lite \
    --adapter /tmp/v2lite/bench_adapter --data /tmp/v2lite/bench_data.jsonl --train-steps 31
  trainer train_int4 120 31 10 --expert-dtype int4
  DTYPES=int4 profile_steps
  bundle_logs
fi
#   PART=g (not run in session 9): experts in host RAM (0 resident), half the clients on the adapter, the batched GPU
#           share (which now takes rows with routed-expert LoRA) against none, in one run: S9-g measured 43.3 tok/s
#           with it where S8-d had 49.9 without any share, on different hosts
if [ "${PART}" = g ]; then
  make_v2lite
  adapter
  for share in 0.3333 0; do
    step serve_r0_adapter_share_$share 170 $NOW python benchmarks/serve_load.py --model /tmp/v2lite --device cuda \
      --dtype bfloat16 --resident-expert-layers 0 --issue-table --token-timing --adapter a=/tmp/v2lite/bench_adapter \
      --serve-cli --decode-gpu-share $share
  done
  bundle_logs
fi
