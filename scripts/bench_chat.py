"""Chat turn speed: reusing the conversation's KV cache vs re-prefilling the whole conversation every turn.

At each conversation length L (tokens already in the conversation), one turn = prefill of a 16-character
user message + 32 new tokens (min_new_tokens = max_new_tokens = 32, greedy). "reuse" prefills only the new
turn on top of the cache (`ChatSession`); "re-prefill" is the same session with `reuse_cache=False`, which
prefills the whole conversation again. Tokens/s = 32 / wall time of `send`. Both compiled beforehand; the
two modes alternate, medians over --reps. Random weights, ASCII ids (vocab 128), fp32.

Workload "small": 6 layers, 6 heads, 384 wide, block 512.

Run:
  python scripts/bench_chat.py --lengths 64,192,384 --reps 5
Prints a table, then one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


class AsciiTokenizer:
    kind, vocab_size, eos_id = "ascii", 128, 0

    def encode(self, text):
        return [min(ord(c), 127) or 1 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="64,192,384")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    import jax

    from jaxgpt.chat import ChatSession
    from jaxgpt.config import ModelConfig
    from jaxgpt.model import init_params

    cfg = ModelConfig(vocab_size=128, block_size=512, n_layer=6, n_head=6, n_embd=384, dropout=0.0)
    params = init_params(cfg, jax.random.key(0))
    tok = AsciiTokenizer()
    N = args.new_tokens
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        sessions = {mode: ChatSession(params, cfg, tok, system="You are a benchmark.", reuse_cache=(mode == "reuse"))
                    for mode in ("reuse", "re-prefill")}
        for s in sessions.values():  # grow the conversation to about L tokens with short turns
            while len(s.tokens) < L - 40:
                s.send("tell me more, please", max_new_tokens=16, min_new_tokens=16, temperature=0.0)
        snap = {m: (list(s.turns), list(s.history), list(s.cached), s.cache) for m, s in sessions.items()}
        times: dict[str, list[float]] = {m: [] for m in sessions}
        for rep in range(args.reps + 1):  # rep 0 compiles
            for mode, s in sessions.items():
                s.turns, s.history, s.cached, s.cache = (list(snap[mode][0]), list(snap[mode][1]),
                                                         list(snap[mode][2]), snap[mode][3])
                t = time.perf_counter()
                s.send("what happens now?", max_new_tokens=N, min_new_tokens=N, temperature=0.0)
                jax.block_until_ready(s.cache)
                if rep:
                    times[mode].append(time.perf_counter() - t)
        conv = len(snap["reuse"][2]) or len(sessions["reuse"].tokens)
        med = {m: statistics.median(v) for m, v in times.items()}
        rows.append({"conversation_tokens": conv, "new_tokens": N,
                     "reuse_s": med["reuse"], "reprefill_s": med["re-prefill"],
                     "reuse_tok_s": N / med["reuse"], "reprefill_tok_s": N / med["re-prefill"],
                     "speedup": med["re-prefill"] / med["reuse"]})
    print(f"{'conv tokens':>11} {'reuse s':>8} {'re-prefill s':>12} {'reuse tok/s':>11} {'re-prefill tok/s':>16} "
          f"{'speedup':>7}")
    for r in rows:
        print(f"{r['conversation_tokens']:>11} {r['reuse_s']:>8.3f} {r['reprefill_s']:>12.3f} {r['reuse_tok_s']:>11.1f} "
              f"{r['reprefill_tok_s']:>16.1f} {r['speedup']:>7.2f}")
    print("JSON " + json.dumps({"workload": "small-block512", "rows": rows}))


if __name__ == "__main__":
    main()
