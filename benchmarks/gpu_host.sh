#!/usr/bin/env bash
# The GPU-host measurements of BENCHMARKS.md, in order, on a fresh machine (one GPU, ~110 GiB RAM, ~35 GB /tmp).
# Offline hosts: put the serve/test wheels in .wheels/ first (pip download ... -d .wheels on a connected machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false
source benchmarks/steps.sh  # $OUT, install_wheels
install_wheels
python -m pytest -q -m gpu tests/ 2>&1 | tail -3
python benchmarks/v2lite.py make --dir /tmp/v2lite
python benchmarks/adamw_cpu.py
python benchmarks/v2lite.py profile --dir /tmp/v2lite --batch 4 --seq 1024 | tee "$OUT/profile.log" | grep '^{'
python benchmarks/v2lite.py train --dir /tmp/v2lite --steps 200 --batch 4 --seq 1024 --log-every 20 | grep '^{'
python benchmarks/v2lite.py train_baseline --dir /tmp/v2lite --steps 8 --batch 4 --seq 1024 | grep '^{'
python benchmarks/v2lite.py chat --dir /tmp/v2lite --prompt-len 1024 --new-tokens 16 | grep '^{'
python benchmarks/v2lite.py profile_decode --dir /tmp/v2lite --new-tokens 12 | tee "$OUT/decode.log" | grep '^{'
python benchmarks/v2lite.py make --dir /tmp/v2l3 --make-layers 3
python benchmarks/v2lite.py train --dir /tmp/v2l3 --steps 1000 --batch 1 --seq 256 --log-every 50 | grep '^{'
