"""Memory of the training step with the LM-head loss unchunked vs chunked (`train.loss_chunk`).

Lowers and compiles `pretrain_step` (no step is run) for GPT-2 124M shapes and reports XLA's memory
analysis: temporaries (where the B x T x V float32 logits and their gradient live) and arguments.

    python scripts/bench_loss_memory.py                    # gpt2 preset, batch 8, block 1024, chunks 0,128
    python scripts/bench_loss_memory.py --batch 1 --loss-chunks 0,64,128,256
    python scripts/bench_loss_memory.py --remat full --scan-layers    # activations recomputed: logits dominate

Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compile import compile_step  # noqa: E402

from jaxgpt.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=["none", "dots_saveable", "full"])
    parser.add_argument("--scan-layers", action="store_true")
    parser.add_argument("--loss-chunks", default="0,128", help="comma-separated train.loss_chunk values (0: unchunked)")
    args = parser.parse_args()
    cfg = ModelConfig(**{**PRESETS[args.preset], "vocab_size": args.vocab, "dtype": args.dtype,
                           "remat": args.remat, "scan_layers": args.scan_layers})
    rows = []
    for chunk in (int(c) for c in args.loss_chunks.split(",")):
        seconds, temp, arg_bytes = compile_step(cfg, args.batch, TrainConfig(steps=10, loss_chunk=chunk))
        rows.append({"loss_chunk": chunk, "compile_s": round(seconds, 2), "temp_bytes": temp,
                     "argument_bytes": arg_bytes})
        print(f"loss_chunk {chunk}: compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    base = rows[0]["temp_bytes"]
    print(f"train step, {args.preset} shapes, batch {args.batch}, block {cfg.block_size}, vocab {cfg.vocab_size}, "
          f"{args.dtype}, remat {args.remat}, scan_layers {args.scan_layers}, on {jax.devices()[0].device_kind}")
    print(f"{'loss_chunk':>10} {'temp MiB':>10} {'args MiB':>10} {'temp vs first':>14} {'compile s':>10}")
    for r in rows:
        print(f"{r['loss_chunk']:>10} {r['temp_bytes'] / 2**20:>10.0f} {r['argument_bytes'] / 2**20:>10.0f} "
              f"{r['temp_bytes'] / base:>13.2f}x {r['compile_s']:>10}")
    print("JSON " + json.dumps({"bench": "loss_memory", "preset": args.preset, "batch": args.batch,
                                "dtype": args.dtype, "remat": args.remat,
                                "scan_layers": args.scan_layers, "device": jax.devices()[0].device_kind, "rows": rows}))


if __name__ == "__main__":
    main()
