# Sourced by the GPU-host scripts: `step NAME SECONDS CMD...` runs CMD with a time limit, logs it to $OUT/NAME.log,
# and prints its exit status, duration and result lines (also appended to $OUT/summary.txt). A step that runs out of
# time leaves its log behind and the next step still runs.
OUT=${OUT:-/tmp/hybridmoe_bench}; mkdir -p "$OUT"
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  grep -E '^\{|passed|failed|page-lock|Error|error:' "$OUT/$name.log" | tail -12 | tee -a "$OUT/summary.txt"
}
