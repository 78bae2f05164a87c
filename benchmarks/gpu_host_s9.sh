#!/usr/bin/env bash
# Session 9 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: where a training step's time goes (issue 20): the trainer's step profiled (phases with syncs, then one
#           step's chrome trace summarized by trace_summary.py: kernels vs host->device copies vs an idle GPU), bf16
#           and int8 experts, batch 4 x 1024, LoRA r=8 on every target; then the trainer itself (`train`) for its tok/s
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
source benchmarks/steps.sh
host_setup
make_v2lite() {
  [ -d /tmp/v2lite ] || step make 80 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
}
if [ "${PART:-a}" = a ]; then
  make_v2lite
  for dt in ${DTYPES:-bfloat16 int8}; do
    step profile_train_$dt 120 $NOW python benchmarks/v2lite.py profile --dir /tmp/v2lite --batch 4 --seq 1024 \
      --expert-dtype $dt
  done
  step train_bf16 100 $NOW python benchmarks/v2lite.py train --dir /tmp/v2lite --batch 4 --seq 1024 --steps 12 \
    --log-every 1
fi
