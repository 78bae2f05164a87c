#!/usr/bin/env bash
# Session 15 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: what session 14 changed after its last GPU run: the C helpers moved into hm_common.h (the kernel's and
#           AMX tests on the Xeon), info's CPU-share line (the split, streaming and decode tests on the GPU); then
#           where a split prefill's caller waits (split.STATS fetch_s / queue_s / wait_s against the CPU part's
#           cpu_s) at shares 0, the default and 0.25, without the profiler's slowdown
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
if [ "${PART:-a}" = a ]; then
  step pytest_cpu 200 $NOW python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_int4_experts.py \
    tests/test_amx.py tests/test_split_prefill.py tests/test_streaming.py -x
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_graph.py \
    tests/test_expert_backends.py
  big prefill_bf16 200 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 default 0.25
  bundle_logs
fi
if [ "${PART:-a}" = b ]; then
  step pytest_split 150 $NOW python -m pytest -q -p no:cacheprovider tests/test_split_prefill.py tests/test_streaming.py -x
  big prefill_threads 420 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 0.2 0.25 0.3 \
    --amx-threads 16 12 8
  bundle_logs
fi
if [ "${PART:-a}" = c ]; then
  step pytest_gpu 200 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_norm.py \
    tests/test_decode_graph.py tests/test_batch_decode.py
  decode_of v2lite_int4 170 v2-lite int4 --norms-ab --kernel-profile --compile-decode
  decode_of v2lite_bf16 110 v2-lite bfloat16 --norms-ab
  big prefill_bf16 90 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 default 0.25
  bundle_logs
fi
if [ "${PART:-a}" = d ]; then
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_norm.py \
    tests/test_decode_graph.py -k "norm or uncapturable or static_decoder"
  decode_of gpt_oss 420 gpt-oss-120b mxfp4 --norms-ab --compile-decode
  bundle_logs
fi
if [ "${PART:-a}" = e ]; then
  step pytest_gpu 330 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/
  big prefill_slots2 80 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 default 0.25 0.3
  big prefill_slots4 80 v2-lite bfloat16 --steps 0 --skip decode train --stream-slots 4 --cpu-shares default 0.25 0.3
  big prefill_slots5 80 v2-lite bfloat16 --steps 0 --skip decode train --stream-slots 5 --cpu-shares 0.25 0.3 0.35
  bundle_logs
fi
if [ "${PART:-a}" = f ]; then
  big prefill_default 100 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares default 0.25 0.3
  OMP_WAIT_POLICY=passive big prefill_passive 100 v2-lite bfloat16 --steps 0 --skip decode train \
    --cpu-shares default 0.25 0.3
  bundle_logs
fi
if [ "${PART:-a}" = g ]; then
  step pytest_cpu 120 $NOW python -m pytest -q -p no:cacheprovider tests/test_amx.py tests/test_split_prefill.py -x
  big prefill_slots2 90 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 default 0.25 0.3 0.35
  big prefill_slots4 90 v2-lite bfloat16 --steps 0 --skip decode train --stream-slots 4 --cpu-shares default 0.25 0.3 0.35
  big prefill_slots5 80 v2-lite bfloat16 --steps 0 --skip decode train --stream-slots 5 --cpu-shares 0.3 0.35
  bundle_logs
fi
if [ "${PART:-a}" = h ]; then
  step pytest_cpu 90 $NOW python -m pytest -q -p no:cacheprovider tests/test_split_prefill.py -x
  big prefill_slots2 90 v2-lite bfloat16 --steps 0 --skip decode train --cpu-shares 0 default 0.25 0.3 0.35
  big prefill_slots5 80 v2-lite bfloat16 --steps 0 --skip decode train --stream-slots 5 --cpu-shares 0.25 0.3 0.35
  bundle_logs
fi
if [ "${PART:-a}" = i ]; then
  make_v2lite
  step readme_example 150 $NOW python benchmarks/readme_example.py --model /tmp/v2lite --no-train
  bundle_logs
fi
