"""bfloat16 vs float32 training: the same config, seed and batches, only `model.dtype` differs.

    python scripts/bench_precision.py                        # "small" on Shakespeare, 300 steps
    python scripts/bench_precision.py --steps 1000 --preset mini

Reports the final validation loss of each, their relative gap (the goal: within ~2%), and tokens/s.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from jaxgpt import config
from jaxgpt.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokenizer", default="sentencepiece")
    args = parser.parse_args()
    results = {}
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = config.load(None, {
                "model.preset": args.preset, "model.dtype": dtype, "data.tokenizer": args.tokenizer,
                "data.vocab_size": 8192, "train.steps": args.steps, "train.batch_size": args.batch,
                "train.eval_every": args.steps, "train.save_every": args.steps, "train.eval_batches": 16,
                "train.log_every": max(1, args.steps // 10), "train.progress": False})
            summary = train(cfg, run_dir)
            results[dtype] = {"val_loss": summary["val_loss"], "tokens_per_sec": summary["tokens_per_sec"]}
    gap = results["bfloat16"]["val_loss"] / results["float32"]["val_loss"] - 1
    print(f"{'dtype':10} {'val loss':>9} {'tokens/s':>9}")
    for dtype, r in results.items():
        print(f"{dtype:10} {r['val_loss']:>9.4f} {r['tokens_per_sec']:>9.0f}")
    print(f"bf16 vs f32 validation loss: {100 * gap:+.2f}%")
    print(json.dumps({"bench": "precision", "preset": args.preset, "steps": args.steps, "results": results,
                      "relative_gap": gap}))


if __name__ == "__main__":
    main()
