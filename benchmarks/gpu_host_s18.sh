#!/usr/bin/env bash
# Session 18 on the GPU host (one H200 + 16-core Xeon), one PART per device call:
#   PART=a: why the CPU kernel ran 24.9-30.9 ms a gpt-oss token in S17-d's compiled decode calls (20.0-20.7 before them
#           in the same process, busy 0.83-0.86): gpt-oss-120b with --compile-decode, inductor's compile workers
#           as by default and then limited to one (TORCHINDUCTOR_COMPILE_THREADS=1: no worker pool), the busiest
#           threads of the host sampled during each run, and the default decode again after the
#           compiled one (--again: is it the process's state after compiling?); the GPU part compiled with gates measured 3.3-3.4 ms a token,
#           which with the kernel's 20 ms would be ~25 ms (40 tok/s)
#   PART=b: the mapped GPU share (hybridmoe.mapped_share: the last n of each token's picked 4-bit experts computed by
#           the GPU from the weights in page-locked host memory, its kernels at the head of the next graph, gates on):
#           the GPU's read rate of host memory (host_gemv.py), gpt-oss-120b MXFP4 and V2-Lite int4 decode at shares
#           alternating with none in one process, then the GPU tests of the new kernel and share
#   PART=c: PART=b read host memory at ~27 GB/s (its DMA: 53-55): the kernel's tilings swept beside PCIe's ceilings
#           (DMA copy_, a read-only Triton kernel) on host memory as the loader keeps it (2 MiB pages, registered);
#           then PART=b's decode runs (the breakdown had failed on the mapped share)
#   PART=d: the mapped share as the 4-bit default (0.2 of the top-K): the kernel's tilings again with single-step
#           ones (a whole row a program step: more bytes in flight), the best for gpt-oss's expert taken for the decode
#           runs (HYBRIDMOE_HOST_GEMV_TILING); gpt-oss decode at the default and none alternating, then compiled
#           (compile_decode) at the default; V2-Lite int4 likewise; then the GPU tests
#   PART=e: the final defaults (mapped share 0.2, tiling 2,2048,2 from PART=d's sweep), as a user gets them: gpt-oss
#           decode plain, compiled, plain again; V2-Lite int4 plain and compiled; the mapped share's GPU tests
#   PART=f: the CPU kernel prefetches each 4-bit tile's scales a tile ahead, and region 2 the next expert's first
#           tile (e8m0 scales are read all at once when a tile starts, so uncached they stalled it): the kernel's
#           tests on the Xeon, then gpt-oss-120b decode (default share) with this kernel, the one before
#           (.wheels/moe_cpu_s18e.c), this one again: three processes
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
host_setup
# watch NAME: the host's busiest threads every 5 s (top's second, instantaneous, sample) and vmstat each second, into
# $OUT/NAME.top and $OUT/NAME.vmstat, until unwatch
watch() {
  vmstat -t 1 > "$OUT/$1.vmstat" 2>&1 & WATCH_PIDS=$!
  (while :; do date +%T; top -H -b -n 2 -d 0.5 -w 160 | awk '/^top -/{n++} n==2' | sed -n 7,26p; sleep 4; done \
    > "$OUT/$1.top" 2>&1) & WATCH_PIDS="$WATCH_PIDS $!"
}
unwatch() { kill $WATCH_PIDS 2>/dev/null; wait $WATCH_PIDS 2>/dev/null; }
if [ "${PART:-a}" = a ]; then
  watch gpt_oss_compiled
  decode_of gpt_oss_compiled 240 gpt-oss-120b mxfp4 --compile-decode --again
  unwatch
  watch gpt_oss_compiled_1
  TORCHINDUCTOR_COMPILE_THREADS=1 decode_of gpt_oss_compiled_1 240 gpt-oss-120b mxfp4 --compile-decode --again
  unwatch
  (cd "$OUT" && tar czf watch.tgz ./*.top ./*.vmstat && rm -f ./*.top ./*.vmstat)
  bundle_logs
fi
if [ "${PART:-a}" = b ]; then
  step host_gemv 90 $NOW python benchmarks/host_gemv.py
  step host_gemv_v2 60 $NOW python benchmarks/host_gemv.py --v2lite
  decode_of gpt_oss_share 200 gpt-oss-120b mxfp4 --gpu-shares 0.25 0 0.25 0 0.5
  decode_of v2lite_share 130 v2-lite int4 --gpu-shares 0.17 0.34 0 0.17 0.34 0
  step pytest_gpu 150 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_host_gemv.py \
    tests/test_mapped_share.py tests/test_graph_gate.py
  bundle_logs
fi
if [ "${PART:-a}" = c ]; then
  TILINGS="16,256,4 32,256,4 64,256,8 16,512,4 32,512,8 8,256,2 16,128,4 64,512,8 128,256,8"
  step host_gemv 120 $NOW python benchmarks/host_gemv.py --ceilings --tilings $TILINGS
  step host_gemv_v2 90 $NOW python benchmarks/host_gemv.py --v2lite --where host --tilings $TILINGS
  decode_of gpt_oss_share 200 gpt-oss-120b mxfp4 --gpu-shares 0.25 0 0.25 0 0.5
  decode_of v2lite_share 130 v2-lite int4 --gpu-shares 0.17 0.34 0 0.17 0.34 0
  bundle_logs
fi
if [ "${PART:-a}" = d ]; then
  TILINGS="16,256,4 8,256,2 4,2048,4 8,2048,4 2,2048,2 4,1024,2 8,1024,4 16,1024,8 4,512,1 8,512,2"
  step host_gemv 120 $NOW python benchmarks/host_gemv.py --where host --tilings $TILINGS
  step host_gemv_v2 90 $NOW python benchmarks/host_gemv.py --v2lite --where host --tilings $TILINGS
  best=$(python - "$OUT/host_gemv.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r["picks"] == 1] or [{"rows": 16, "step_bytes": 256, "warps": 4, "GBps": 0}]
b = max(rows, key=lambda r: r["GBps"])
print(f'{b["rows"]},{b["step_bytes"]},{b["warps"]}')
PY
)
  echo "== tiling $best" | tee -a "$OUT/summary.txt"
  export HYBRIDMOE_HOST_GEMV_TILING=$best
  decode_of gpt_oss_default 240 gpt-oss-120b mxfp4 --gpu-shares 0 0.2 0 --compile-decode
  decode_of v2lite_default 130 v2-lite int4 --gpu-shares 0 0.2 0 0.2
  step pytest_gpu 170 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_host_gemv.py \
    tests/test_mapped_share.py tests/test_graph_gate.py tests/test_decode_graph.py tests/test_decode_norm.py
  bundle_logs
fi
if [ "${PART:-a}" = e ]; then
  decode_of gpt_oss_final 240 gpt-oss-120b mxfp4 --compile-decode --again
  decode_of v2lite_final 130 v2-lite int4 --compile-decode
  step pytest_gpu 120 $NOW python -m pytest -q -m gpu -p no:cacheprovider tests/test_host_gemv.py \
    tests/test_mapped_share.py tests/test_graph_gate.py
  bundle_logs
fi
if [ "${PART:-a}" = f ]; then
  build_kernel_lib .wheels/moe_cpu_s18e.c /tmp/moe_cpu_old.so
  step pytest_cpu 90 $NOW python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_int4_experts.py \
    -k "mxfp4 or e8m0 or int4" -x
  decode_of gpt_oss_new 110 gpt-oss-120b mxfp4
  HYBRIDMOE_CPU_KERNEL_LIB=/tmp/moe_cpu_old.so decode_of gpt_oss_old 110 gpt-oss-120b mxfp4
  decode_of gpt_oss_new2 110 gpt-oss-120b mxfp4
  bundle_logs
fi
