#!/usr/bin/env bash
# GPU check for the engine (issue 2): exactness tests on CUDA, then `aegaeon bench engine` with the
# 7B-shaped bf16 demo model. Fits in 8 minutes on one H100/H200. Results go to $OUT (default
# /tmp/aegaeon-gpu): tests.txt, bench.txt, bench_engine_cuda.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-/tmp/aegaeon-gpu}
MODELS=${MODELS:-/dev/shm/aegaeon-gpu-models}   # shared memory: the host model cache lives there
mkdir -p "$OUT"
# Containers often have a tiny /dev/shm: the 7B model (13.5 GB) plus the host KV pool need ~30 GB.
shm_free_gb=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
if [ "${shm_free_gb:-0}" -lt 32 ]; then
  echo "/dev/shm has ${shm_free_gb:-0} GB free: using /tmp for the model cache and host KV pool"
  MODELS=/tmp/aegaeon-gpu-models
  export AEGAEON_SHM_DIR=/tmp
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"

# 1. Exactness on CUDA (tests run on cpu and cuda; fp32 on both, compared with transformers).
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/engine 2>&1 | tail -25 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}

# 2. The engine bench with the 7B-shaped bf16 Llama (written once into shared memory).
timeout 330 "$PY" -m aegaeon.cli bench engine --device cuda --large --model demo-llama-7b \
  --models-dir "$MODELS" --json "$OUT/bench_engine_cuda.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

rm -rf "$MODELS"
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
