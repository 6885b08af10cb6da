"""Rows of token ids in, per-token log-probabilities out, around any forward pass; no model code.

`jaxgpt.scoring` runs it on a live model, `jaxgpt.exported` on an exported scoring program, so both batch,
pad and answer the same way: rows are right-padded to `score_length` (a power of two >= 16, at most the
context), similar lengths share a batch, and causal attention means the padding never changes the real
positions. Position t holds log p(token t | tokens < t); position 0 has no context and is NaN.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from jaxgpt.errors import JaxgptError
from jaxgpt.sampling import MAX_TOP, prompt_bucket

# run(tokens_BxT) -> (logprob_BxT1, greedy_BxT1, top_ids_BxT1xK, top_logprob_BxT1xK) for positions 1..T-1
Forward = Callable[[np.ndarray], Sequence[np.ndarray]]


class TokenLogprobs(NamedTuple):
    """One row's per-token results; index t describes token t of the row."""

    logprob_T: np.ndarray  # float32 log p(token t | tokens < t); NaN at t = 0
    greedy_T: np.ndarray  # bool: token t was the argmax (False at t = 0)
    top_ids_TxK: np.ndarray  # the K most likely ids at t, best first (K = 0 unless asked)
    top_logprob_TxK: np.ndarray


class Score(NamedTuple):
    """lm-evaluation-harness's loglikelihood answer for one (context, continuation) pair."""

    logprob: float  # sum of the continuation's token log-probabilities
    greedy: bool  # every continuation token was the argmax given what came before


def score_length(n: int, block_size: int) -> int:
    """The padded length a row of n tokens is scored at."""
    return min(prompt_bucket(n), block_size)


def score_lengths(block_size: int) -> list[int]:
    """Every padded length a row can be scored at (an export holds one scoring program per length)."""
    return sorted({score_length(1 << k, block_size) for k in range(block_size.bit_length() + 1)})


def check_rows(rows: Sequence[Sequence[int]], block_size: int, top_n: int, n_vocab: int) -> None:
    if not 0 <= top_n <= min(MAX_TOP, n_vocab):
        raise JaxgptError(f"top_n must be in [0, {min(MAX_TOP, n_vocab)}], got {top_n}")
    for row in rows:
        if not 0 < len(row) <= block_size:
            raise JaxgptError(f"a row to score has {len(row)} tokens; it must have 1 to {block_size} "
                              "(the model's context)")


def batched_logprobs(run: Forward, rows: Sequence[Sequence[int]],
                     block_size: int, top_n: int, batch_size: int,
                     padded_rows: Callable[[int], int]) -> list[TokenLogprobs]:
    """Score `rows` (checked with `check_rows`) `batch_size` at a time; `run` takes a batch padded to
    `padded_rows(n)` rows and returns at least `top_n` alternatives per position."""
    out: list[TokenLogprobs | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a padded batch
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        tokens_BxT = np.zeros((padded_rows(len(group)), score_length(max(len(rows[i]) for i in group), block_size)),
                              np.int32)
        for b, i in enumerate(group):
            tokens_BxT[b, :len(rows[i])] = rows[i]
        target, greedy, top_ids, top_lp = (np.asarray(a) for a in run(tokens_BxT))
        K = top_ids.shape[-1]
        for b, i in enumerate(group):
            n = len(rows[i])
            out[i] = TokenLogprobs(np.concatenate([[np.nan], target[b, :n - 1]]).astype(np.float32),
                                   np.concatenate([[False], greedy[b, :n - 1]]),
                                   np.concatenate([np.zeros((1, K), np.int32), top_ids[b, :n - 1]])[:, :top_n],
                                   np.concatenate([np.full((1, K), np.nan, np.float32), top_lp[b, :n - 1]])[:, :top_n])
    return out


def continuation_scores(contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                        logprobs: Callable[[list[list[int]]], list[TokenLogprobs]]) -> list[Score]:
    """Sum of log p(continuation | context) and whether greedy decoding would produce it, per pair, from
    `logprobs(rows)` (a scorer's per-token results). Each context needs at least one token."""
    if len(contexts) != len(continuations):
        raise JaxgptError(f"{len(contexts)} contexts but {len(continuations)} continuations; pass one of each per pair")
    for ctx in contexts:
        if not ctx:
            raise JaxgptError("a context is empty; start it from the end-of-text token")
    results = logprobs([list(c) + list(x) for c, x in zip(contexts, continuations)])
    scores = []
    for ctx, r in zip(contexts, results):
        scored = slice(len(ctx), None)
        scores.append(Score(float(np.sum(r.logprob_T[scored], dtype=np.float64)), bool(np.all(r.greedy_T[scored]))))
    return scores


def score_texts(tokenizer, block_size: int, context: str | list[str], continuation: str | list[str],
                logprobs: Callable[[list[list[int]]], list[TokenLogprobs]]) -> Score | list[Score]:
    """`model.score(context, continuation)` for any scorer: strings in, one Score out; lists in, lists out.

    Context and continuation are encoded separately and joined; an empty context starts from end-of-text.
    """
    single = isinstance(context, str)
    contexts, continuations = ([context], [continuation]) if single else (list(context), list(continuation))
    ctx_ids = [tokenizer.encode(c) or [tokenizer.eos_id] for c in contexts]
    cont_ids = [tokenizer.encode(c) for c in continuations]
    for c, x in zip(ctx_ids, cont_ids):
        if len(c) + len(x) > block_size:
            raise JaxgptError(f"context + continuation is {len(c) + len(x)} tokens, longer than the model's "
                              f"context of {block_size}; shorten the context")
    scores = continuation_scores(ctx_ids, cont_ids, logprobs)
    return scores[0] if single else scores
