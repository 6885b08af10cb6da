"""Generation past the context window, planned without model code: jaxgpt.generate (a live model) and
jaxgpt.exported (an artifact) slide the same way.

Each round, every row still going continues from its whole text (prompt + output so far) while the
longest fits `window`, else from its newest tokens (half the context, at most `window`), re-prefilled, as
nanoGPT's samplers crop the context. Round 0 uses the rows' own keys (`row_keys`), so a generation that
fits draws exactly what `slide=False` draws; round r folds r into them.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import numpy as np

from jaxgpt.sampling import SamplingParams, row_keys


class Round:
    """One round of sliding generation: which rows go on, from what context, for how many tokens."""

    def __init__(self, rows: list[int], contexts: list[list[int]], n: int, keys_B: jax.Array,
                 sampling: SamplingParams, outputs: list[list[int]], alive: set[int]):
        self.rows, self.contexts, self.n, self.keys_B, self.sampling = rows, contexts, n, keys_B, sampling
        self._outputs, self._alive = outputs, alive

    def record(self, new: list[list[int]], done: list[bool]) -> None:
        """Append each row's new tokens; a row that ended (end-of-text, stop, short) leaves the next rounds."""
        for b, toks, d in zip(self.rows, new, done):
            self._outputs[b] += toks
            if d or len(toks) < self.n:
                self._alive.discard(b)


def rounds(prompts: list[list[int]], outputs: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
           seed: int | Sequence[int], *, block_size: int, window: int, most: int | None = None,
           reread: bool = False) -> Iterator[Round]:
    """Rounds until every row has `max_new_tokens` in `outputs` or has ended (`Round.record` after each).

    A round makes at most `most` tokens (default: all that fit the context). Only round 0 reads whole texts
    unless `reread` (an export streamed in chunks re-reads while the text fits its largest prompt bucket).
    """
    keep = min(window, block_size // 2)
    keys_B = row_keys(seed, len(prompts))
    alive = set(range(len(prompts)))
    for round_ in range(max_new_tokens):  # each round adds >= 1 token per live row: the bound is never reached
        rows = sorted(alive)
        todo = max_new_tokens - len(outputs[rows[0]]) if rows else 0
        if todo <= 0:
            return
        texts = [prompts[b] + outputs[b] for b in rows]
        fits = (round_ == 0 or reread) and max(len(t) for t in texts) <= window
        contexts = texts if fits else [t[-keep:] for t in texts]
        n = min(todo, most or todo, block_size - max(len(c) for c in contexts))
        rkeys = keys_B[np.asarray(rows)]
        if round_:
            rkeys = jax.vmap(lambda k: jax.random.fold_in(k, round_))(rkeys)
        s = sampling._replace(min_new_tokens=max(0, sampling.min_new_tokens - (max_new_tokens - todo)))
        yield Round(rows, contexts, n, rkeys, s, outputs, alive)
