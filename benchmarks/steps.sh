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

# Offline hosts: install the wheels put in .wheels/ (README, "Development": the serve extra, openai, and kt-kernel +
# gguf for its baseline) into /tmp/pydeps, on PYTHONPATH. A no-op without .wheels/.
install_wheels() {
  [ -d .wheels ] || return 0
  # Every wheel there, without resolving (they were downloaded for this host's Python, deps included; xgrammar's
  # torch/transformers/triton are the host's own).
  python -m pip install -q --no-index --no-deps --target /tmp/pydeps .wheels/*.whl > "$OUT/pip.log" 2>&1
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/pydeps
}

# The common start of the session scripts: the carried wheels, the machine's description in $OUT/machine.txt, and
# NOW, the command prefix that runs python with this tree's src/ first.
host_setup() {
  install_wheels  # the serve extra + openai for the serving GPU tests (carried as .wheels/)
  { nvidia-smi -L; nproc; free -g; lscpu | grep -E "Model name|Flags" | cut -c1-200; } > "$OUT/machine.txt" 2>&1
  NOW="env PYTHONPATH=$PWD/src:${PYTHONPATH:-}"
}
