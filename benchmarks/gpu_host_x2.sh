#!/usr/bin/env bash
# Issue 8 and 9 on a 2-GPU host (fresh machine, ~70 GiB RAM free, ~35 GB /tmp): the 2-GPU tests, 1- vs 2-GPU
# V2-Lite-shaped training, and the server's load test on the V2-Lite-shaped model. Offline hosts: put the serve
# wheels in .wheels/ first (see README, "GPU-host benchmarks").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-30}
if [ -d .wheels ]; then pip install -q --no-index --find-links .wheels fastapi uvicorn openai httpx --target /tmp/pydeps \
  && export PYTHONPATH=$PYTHONPATH:/tmp/pydeps; fi
nvidia-smi -L; nproc; free -g | head -2; df -h /dev/shm | tail -1
python -m pytest -q -m gpu tests/test_distributed.py 2>&1 | tail -3
python benchmarks/v2lite.py make --dir /tmp/v2lite
for n in 1 2; do
  python benchmarks/v2lite.py train --dir /tmp/v2lite --steps "$STEPS" --batch 4 --seq 1024 --log-every 10 --nproc $n \
    2>&1 | grep -E '^\{|page-lock|rror'
done
python benchmarks/v2lite.py adapter --dir /tmp/v2lite | grep '"adapter"'
CUDA_VISIBLE_DEVICES=0 python benchmarks/serve_load.py --model /tmp/v2lite --device cuda --dtype bfloat16 \
  --adapter a=/tmp/v2lite/bench_adapter --adapter b=/tmp/v2lite/bench_adapter2 --clients 16 --requests 4 \
  --max-tokens 32 2>&1 | grep -E '^\{|rror'
