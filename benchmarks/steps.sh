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

# The common start of the session scripts: their environment, the carried wheels, the machine's description in
# $OUT/machine.txt, and NOW, the command prefix that runs python with this tree's src/ first.
host_setup() {
  export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  install_wheels  # the serve extra + openai for the serving GPU tests (carried as .wheels/)
  { nvidia-smi -L; nproc; free -g; lscpu | grep -E "Model name|Flags|Thread|Core|Socket|NUMA|cache|MHz" | cut -c1-200; } > "$OUT/machine.txt" 2>&1
  NOW="env PYTHONPATH=$PWD/src:${PYTHONPATH:-}"
}

# big NAME SECONDS MODEL FORMAT [flags]: benchmarks/big_models.py on MODEL built in place in FORMAT
big() {
  local name=$1 limit=$2 model=$3 fmt=$4
  shift 4
  step "$name" "$limit" $NOW python benchmarks/big_models.py --model "$model" --format "$fmt" "$@"
}

# decode_of NAME SECONDS MODEL FORMAT [flags]: big_models.py's decode rows only (built in place)
decode_of() { big "$@" --steps 0 --skip prefill train; }

# The V2-Lite-shaped runs of the session scripts (gpu_host_s9.sh, gpu_host_s10.sh):
# make_v2lite: the random V2-Lite checkpoint in /tmp/v2lite (once per host)
make_v2lite() {
  [ -d /tmp/v2lite ] || step make 80 $NOW python benchmarks/v2lite.py make --dir /tmp/v2lite
}
# profile_steps: the trainer's step profiled (v2lite.py profile), one process per expert dtype in $DTYPES
profile_steps() {
  for dt in ${DTYPES:-bfloat16 int8}; do
    step profile_train_$dt 120 $NOW python benchmarks/v2lite.py profile --dir /tmp/v2lite --batch 4 --seq 1024 \
      --expert-dtype $dt
  done
}
# trainer NAME SECONDS STEPS LOG_EVERY [flags]: the trainer's code path (v2lite.py train) at batch 4 x 1024
trainer() {
  local name=$1 limit=$2 steps=$3 every=$4
  shift 4
  step "$name" "$limit" $NOW python benchmarks/v2lite.py train --dir /tmp/v2lite --batch 4 --seq 1024 --steps "$steps" \
    --log-every "$every" "$@"
}
# bundle_logs: the logs and traces back as one archive (the device returns a limited number of files)
bundle_logs() {
  (cd "$OUT" && tar czf bundle.tgz ./*.log ./*.json.gz 2>/dev/null && rm -f ./*.log ./*.json.gz)
}

# build_kernel_lib SRC LIB: an earlier moe_cpu.c (carried in .wheels/) built as the kernel library LIB, for an A/B
# against this tree's kernel (HYBRIDMOE_CPU_KERNEL_LIB=LIB selects it)
build_kernel_lib() {
  cc -O3 -fPIC -fopenmp -I src/hybridmoe/experts -c "$1" -o /tmp/kernel_ab.o && cc -shared /tmp/kernel_ab.o -o "$2" -lm
}
