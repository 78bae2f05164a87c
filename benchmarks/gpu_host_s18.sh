#!/usr/bin/env bash
# Session 18 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: why the CPU kernel ran 24.9-30.9 ms a gpt-oss token in S17-d's compiled decode calls (20.0-20.7 before them
#           in the same process, busy 0.83-0.86): gpt-oss-120b with --compile-decode, inductor's compile workers
#           as by default and then limited to one (TORCHINDUCTOR_COMPILE_THREADS=1: no worker pool), the busiest
#           threads of the host sampled during each run; the GPU part compiled with gates measured 3.3-3.4 ms a token,
#           which with the kernel's 20 ms would be ~25 ms (40 tok/s)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
# sample NAME AFTER: the host's busiest threads AFTER seconds from now, into $OUT/NAME.ps (in the background)
sample() { (sleep "$2"; ps -eLo pcpu,pid,comm --sort=-pcpu | head -40 > "$OUT/$1.ps") & }
if [ "${PART:-a}" = a ]; then
  sample gpt_oss_compiled 75
  decode_of gpt_oss_compiled 240 gpt-oss-120b mxfp4 --compile-decode
  sample gpt_oss_compiled_1 75
  TORCHINDUCTOR_COMPILE_THREADS=1 decode_of gpt_oss_compiled_1 240 gpt-oss-120b mxfp4 --compile-decode
  bundle_logs
fi
