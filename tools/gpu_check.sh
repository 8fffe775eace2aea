#!/usr/bin/env bash
# The GPU check (issues 8 and 9), for a bare, offline CUDA machine (Python 3.12 with torch CUDA
# and transformers; no .venv). Prepare here with tools/gpu_wheels.sh (fills .whl/), carry .whl,
# then run this there. Under 8 minutes on one H100/H200; CUDA cases only (the CPU ones run in CI).
# Full logs go to $OUT (default /tmp/aegaeon-gpu): gpu.txt, tests.log, bench.log,
# bench_engine_cuda.json, prefetch.log, prefetch_cuda.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/aegaeon-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
[ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null && PY=.venv/bin/python
export PYTHONUNBUFFERED=1

# 0. CUDA first: nothing else is worth the time without it.
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to $PY: nothing to check" | tee "$OUT/gpu.txt"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"

# 1. The project and what the image lacks, offline, unless already importable. -P: the checkout's
#    own aegaeon/ folder must not shadow the installed package (services live elsewhere in it).
if ! "$PY" -P -c 'import aegaeon.gpu_worker.engine' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run tools/gpu_wheels.sh first and carry .whl"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/aegaeon-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/aegaeon-site${PYTHONPATH:+:$PYTHONPATH}
fi

MODELS=${MODELS:-/dev/shm/aegaeon-gpu-models}   # shared memory: the host model cache lives there
# Containers often have a small /dev/shm: the 7B model (13.5 GB) plus the host KV pool need ~30 GB.
shm_free_gb=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
if [ "${shm_free_gb:-0}" -lt 32 ]; then
  echo "/dev/shm has ${shm_free_gb:-0} GB free: using /tmp for the model cache and host KV pool"
  MODELS=/tmp/aegaeon-gpu-models
  export AEGAEON_SHM_DIR=/tmp
fi

# 2. Exactness on CUDA: every engine test's cuda case (fp32 vs transformers, bf16 invariance,
#    swap, switch, prefetch racing decode, KV export/import).
#    The worker-shell tests need NATS and Redis (not in the image): they run in CI.
timeout 150 "$PY" -P -m pytest -q -p no:cacheprovider tests/engine -k cuda -rf --durations=10 \
  --ignore-glob='tests/engine/test_worker_*.py' --ignore=tests/engine/test_failure_isolation.py \
  >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -15 "$OUT/tests.log"

# 3. Live prefetch against decode on the copy stream, and the KV hand-off between two engines
#    (writes the 7B-shaped bf16 Llama into $MODELS first).
timeout 180 "$PY" -P tools/gpu_prefetch_check.py --models-dir "$MODELS" \
  --json "$OUT/prefetch_cuda.json" >"$OUT/prefetch.log" 2>&1
prefetch_rc=$?
tail -30 "$OUT/prefetch.log"

# 4. The engine bench with the same 7B-shaped bf16 Llama.
timeout 280 "$PY" -P -m aegaeon.cli bench engine --device cuda --large --model demo-llama-7b \
  --models-dir "$MODELS" --json "$OUT/bench_engine_cuda.json" >"$OUT/bench.log" 2>&1
bench_rc=$?
tail -40 "$OUT/bench.log"

rm -rf "$MODELS"
echo "tests rc=$tests_rc bench rc=$bench_rc prefetch rc=$prefetch_rc"
exit $(( tests_rc != 0 || bench_rc != 0 || prefetch_rc != 0 ))
