#!/usr/bin/env bash
# Session 10 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: the GPU tests of the code changed since the last GPU run (decode graphs' shared dense expert math, the
#           staged expert-LoRA gradients kept per backward pass), then where a training step's time goes for 4-bit
#           experts streamed as 4-bit: gpt-oss-120b's shape with MXFP4 experts (8 of its 36 layers) and V2-Lite with
#           int4, built in place (big_models.py --profile: one step's trace summarized by trace_summary.py)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
# big_train NAME SECONDS MODEL FORMAT [flags]: big_models.py, training only, with one profiled step
big_train() { big "$@" --skip decode prefill --profile; }
if [ "${PART:-a}" = a ]; then
  step pytest_gpu 240 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_batch_decode.py \
    tests/test_decode_graph.py tests/test_streaming.py tests/test_train.py tests/test_equivalence.py \
    tests/test_staged_grads.py
  big_train gptoss_mxfp4_l8 200 gpt-oss-120b mxfp4 --layers 8 --steps 3
  big_train v2lite_int4 150 v2-lite int4 --steps 4
  bundle_logs
fi
#   PART=b: after 4-bit experts are dequantized on the GPU by one Triton kernel (S10-a: the torch version's
#           elementwise kernels took ~1.4 of gpt-oss's 2.1 s step): its GPU tests, then the same two training traces
if [ "${PART}" = b ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_dequant_gpu.py \
    tests/test_int4_experts.py tests/test_streaming.py tests/test_decode_graph.py
  big_train gptoss_mxfp4_l8 200 gpt-oss-120b mxfp4 --layers 8 --steps 3
  big_train v2lite_int4 150 v2-lite int4 --steps 4
  bundle_logs
fi
#   PART=c: after the expert LoRA's AdamW moved to a worker thread (overlapping the next forward) and landed gradients
#           became the staging buffers (no clone, no free): the GPU tests of training, then issue 20's training rows
#           through the trainer: bf16, int8, int4 (31 steps, logging every 10, as the example YAMLs)
if [ "${PART}" = c ]; then
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_train.py \
    tests/test_resume_exact.py tests/test_equivalence.py tests/test_int8_experts.py tests/test_cpu_optim.py
  make_v2lite
  trainer train_bf16 100 31 10
  trainer train_int8 100 31 10 --expert-dtype int8
  trainer train_int4 100 31 10 --expert-dtype int4
  bundle_logs
fi
# gptoss_row, glm_row [flags]: issue 16's 100B-class models built in place (big_models.py): gpt-oss-120b with MXFP4
# experts as shipped (decode, prefill, 3 training steps), GLM-4.5-Air with int4 experts (flags say what to measure)
gptoss_row() {
  big gptoss_mxfp4 200 gpt-oss-120b mxfp4 --steps 3
}
glm_row() {
  big glm_air_int4 150 glm-4.5-air int4 "$@"
}
#   PART=d: issue 16's 100B-class rows with the Triton dequantization and the overlapped step: gpt-oss-120b (MXFP4
#           as shipped: decode, prefill, training) and GLM-4.5-Air (int4: training), all layers, built in place; then
#           the trainer's step profiled on V2-Lite, bf16 and int4 (where the trainer's time goes against the loop)
if [ "${PART}" = d ]; then
  gptoss_row
  glm_row --steps 3 --skip decode prefill
  make_v2lite
  DTYPES="bfloat16 int4" profile_steps
  bundle_logs
fi
#   PART=e: the final code (the clip's scaling of the expert LoRA's gradients moved to the overlapped step's worker):
#           GPU tests of training, issue 20's bf16 and int4 rows through the trainer (bf16 with one whole trainer step
#           traced), then the README's Python example as written (benchmarks/readme_example.py, 31 training steps)
if [ "${PART}" = e ]; then
  step pytest_gpu 100 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_train.py \
    tests/test_cpu_optim.py tests/test_resume_exact.py tests/test_equivalence.py
  make_v2lite
  trainer train_bf16 100 31 10 --trace-step 15
  trainer train_int4 110 31 10 --expert-dtype int4
  step adapter 60 $NOW python benchmarks/v2lite.py adapter --dir /tmp/v2lite
  step readme_example 170 $NOW python benchmarks/readme_example.py --model /tmp/v2lite \
    --adapter /tmp/v2lite/bench_adapter --data /tmp/v2lite/bench_data.jsonl --train-steps 31
  bundle_logs
fi
#   PART=f: issue 20's bf16 row through the trainer on the final code, with no traced step in it: 41 steps logged
#           every 5 (the median of 8 windows after the first)
if [ "${PART}" = f ]; then
  make_v2lite
  trainer train_bf16 120 41 5
  bundle_logs
fi
#   PART=g, PART=h (not run in session 10: no device time left): what was built after the last GPU run.
#   g: the GPU tests of the touched paths (one dequantized projection at a time, the clip's early CPU norms, the
#      overlapped step), the CPU kernel's tests on the Xeon (MXFP4 on AVX2 integer dots there too, every instruction
#      set it has), the kernels at gpt-oss's dims (decode_gemv.py --mxfp4), and issue 20's bf16 trainer row again
if [ "${PART}" = g ]; then
  step pytest_gpu 120 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_train.py tests/test_cpu_optim.py \
    tests/test_equivalence.py tests/test_int4_experts.py tests/test_streaming.py tests/test_dequant_gpu.py
  step pytest_kernel 120 $NOW python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_int4_experts.py
  step gemv_gptoss 120 $NOW python benchmarks/decode_gemv.py --layers 4 --experts 32 --topk 4 --hidden 2880 \
    --inter 2880 --calls 200 --mxfp4
  make_v2lite
  trainer train_bf16 120 41 5
  bundle_logs
fi
#   h: gpt-oss-120b (decode with the MXFP4 integer dots; training and decoding peaks with one dequantized projection
#      at a time) and GLM-4.5-Air's decode
if [ "${PART}" = h ]; then
  gptoss_row
  glm_row --steps 0 --skip prefill train
  bundle_logs
fi
