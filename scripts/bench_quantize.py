"""int8 weight-only quantization vs float32: perplexity, parameter bytes, and greedy decode speed.

* perplexity: the run dir's validation split (`jaxgpt.data.corpus.prepare(cfg.data, tokenizer).val`, the
  first --val-tokens tokens), non-overlapping windows of block_size (jaxgpt.perplexity), float vs int8.
* bytes: every parameter (int8 values + float32 scales for quantized weights) vs all-float32.
* decode speed: new tokens/s of jaxgpt.generate.generate_ids (greedy, end-of-text never stops a row,
  --prompt-len prompt tokens, --new-tokens new ones) per batch size, compiled before timing; float and
  int8 calls alternate and the median of --rounds x --reps calls is kept. `--preset gpt2` adds a
  random-weight model of that preset (speed and bytes only), where weight reads weigh more.

Run:
  python scripts/bench_quantize.py --run-dir runs/shakespeare
  python scripts/bench_quantize.py --run-dir runs/shakespeare --preset gpt2 --batches 1,8 --json-out q.json
Prints a table, then one line `JSON {...}` (also written to --json-out FILE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

import jaxgpt
from jaxgpt import config as config_lib
from jaxgpt.data import corpus
from jaxgpt.generate import SamplingParams, generate_ids
from jaxgpt.model import init_params
from jaxgpt.perplexity import perplexity
from jaxgpt.quantize import param_bytes, quantize_params


def decode_speed(variants: dict, cfg, batch: int, prompt_len: int, new_tokens: int, rounds: int, reps: int):
    """Median new tokens/s per variant (name -> params), calls alternating between variants."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, cfg.vocab_size, (batch, prompt_len)).tolist()

    def call(params):
        out = generate_ids(params, cfg, prompts, new_tokens, eos_id=-1, sampling=SamplingParams(0.0))
        return sum(len(r) for r in out)

    for params in variants.values():  # compile
        call(params)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, params in variants.items():
            for _ in range(reps):
                t = time.perf_counter()
                n = call(params)
                times[name].append(time.perf_counter() - t)
    return {name: n / statistics.median(ts) for name, ts in times.items()}


def val_perplexity(model, val_tokens: int) -> dict[str, float]:
    ids = np.asarray(corpus.prepare(model.cfg.data, model.tokenizer).val[:val_tokens]).tolist()
    out = {}
    for name, params in (("float32", model.params), ("int8", quantize_params(model.params))):
        r = perplexity(params, model.cfg.model, ids, n_vocab=model.tokenizer.vocab_size)
        out[name] = r.perplexity
        out["n_scored"] = r.n_scored
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a trained run dir (e.g. the Shakespeare demo)")
    ap.add_argument("--preset", action="append", default=[], help="also time a random-weight preset (repeatable)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--val-tokens", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    model = jaxgpt.load(args.run_dir)
    results = {"run_dir": args.run_dir, "batches": batches, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "backend": jax.default_backend(), "models": {}}
    ppl = val_perplexity(model, args.val_tokens)
    targets = [(args.run_dir, model.cfg.model, model.params)]
    for preset in args.preset:
        cfg = config_lib.load(None, {"model.preset": preset}).model
        targets.append((f"{preset} (random weights)", cfg, init_params(cfg, jax.random.key(0))))
    for name, cfg, params in targets:
        qparams = quantize_params(params)
        row = {"bytes_float32": param_bytes(params), "bytes_int8": param_bytes(qparams), "tokens_per_s": {}}
        for b in batches:
            row["tokens_per_s"][b] = decode_speed({"float32": params, "int8": qparams}, cfg, b, args.prompt_len,
                                                  args.new_tokens, args.rounds, args.reps)
        results["models"][name] = row
    results["perplexity"] = ppl

    print(f"validation perplexity ({ppl['n_scored']} tokens): float32 {ppl['float32']:.4f}  int8 {ppl['int8']:.4f}  "
          f"change {100 * (ppl['int8'] / ppl['float32'] - 1):+.3f}%")
    print(f"{'model':32} {'MB f32':>8} {'MB int8':>8} {'saved':>6}  " +
          "  ".join(f"{'b' + str(b) + ' f32/int8 tok/s':>24}" for b in batches))
    for name, row in results["models"].items():
        saved = 1 - row["bytes_int8"] / row["bytes_float32"]
        speeds = "  ".join(f"{s['float32']:>9.0f} / {s['int8']:>6.0f} ({s['int8'] / s['float32']:.2f}x)"
                           for s in row["tokens_per_s"].values())
        print(f"{name[-32:]:32} {row['bytes_float32'] / 1e6:>8.2f} {row['bytes_int8'] / 1e6:>8.2f} {saved:>6.1%}  {speeds}")
    line = json.dumps(results)
    print("JSON " + line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
