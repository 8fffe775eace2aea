#!/usr/bin/env bash
# Run HERE (a machine with pip and the network) before a GPU check: puts into .whl/ (git-ignored)
# this project's wheel and the cp312 manylinux wheels of the few packages a bare GPU image lacks,
# so tools/gpu_check.sh can install them offline with `pip install --no-index --no-deps`.
# The GPU image (Python 3.12, torch CUDA, transformers, safetensors, tokenizers, numpy, tqdm,
# nvidia-ml-py) has all the engine needs but msgspec and this project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$PY" -m build --wheel --outdir .whl . >/dev/null
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "msgspec==$("$PY" -c 'import msgspec; print(msgspec.__version__)')"
ls -1 .whl
