"""Log-probabilities of given tokens: `LanguageModel.score` and the server's `logprobs`/`echo`.

One full forward pass per row (the same `GPT.apply` as `LanguageModel.logits`), then a float32
log-softmax over the real vocabulary (padding ids of a padded embedding table are excluded). Position t
holds log p(token t | tokens < t); position 0 has no context and is NaN. Rows are right-padded to a
power-of-two length and batched `batch_size` at a time, so a batch of texts costs a compile per length
bucket; causal attention means the padding never changes the real positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import prompt_bucket
from jaxgpt.model import GPT
from jaxgpt.sampling import MAX_TOP


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


def _top_bucket(top_n: int) -> int:
    """Compile top-k for a few sizes only (0, 1, 2, 4, ..., 32)."""
    return 0 if top_n <= 0 else 1 << (top_n - 1).bit_length()


@functools.lru_cache(maxsize=32)
def _scorer(cfg: ModelConfig, top_k: int):
    def run(params, tokens_BxT, n_vocab):
        logits_BxTxV = GPT(cfg).apply({"params": params}, tokens_BxT)[0].astype(jnp.float32)
        logits_BxTxV = jnp.where(jnp.arange(cfg.vocab_size) < n_vocab, logits_BxTxV, -jnp.inf)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)  # predicts tokens 1..T-1
        target_BxT1 = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
        greedy_BxT1 = jnp.argmax(logp_BxTxV, axis=-1) == tokens_BxT[:, 1:]
        if top_k:
            top_lp_BxT1xK, top_id_BxT1xK = jax.lax.top_k(logp_BxTxV, top_k)
        else:
            top_lp_BxT1xK = jnp.zeros(target_BxT1.shape + (0,), jnp.float32)
            top_id_BxT1xK = jnp.zeros(target_BxT1.shape + (0,), jnp.int32)
        return target_BxT1, greedy_BxT1, top_id_BxT1xK, top_lp_BxT1xK

    return jax.jit(run)


def token_logprobs(params, cfg: ModelConfig, rows: Sequence[Sequence[int]], n_vocab: int | None = None,
                   top_n: int = 0, batch_size: int = 8) -> list[TokenLogprobs]:
    """Per-token log-probabilities (and the `top_n` best alternatives) of each row of token ids."""
    n_vocab = n_vocab or cfg.vocab_size
    if not 0 <= top_n <= min(MAX_TOP, n_vocab):
        raise JaxgptError(f"top_n must be in [0, {min(MAX_TOP, n_vocab)}], got {top_n}")
    for row in rows:
        if not 0 < len(row) <= cfg.block_size:
            raise JaxgptError(f"a row to score has {len(row)} tokens; it must have 1 to {cfg.block_size} "
                              "(the model's context)")
    K = min(_top_bucket(top_n), n_vocab)
    run = _scorer(cfg, K)
    out: list[TokenLogprobs | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a padded batch
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        T = min(prompt_bucket(max(len(rows[i]) for i in group)), cfg.block_size)
        tokens_BxT = np.zeros((1 << (len(group) - 1).bit_length(), T), np.int32)  # rows padded to a power of 2
        for b, i in enumerate(group):
            tokens_BxT[b, :len(rows[i])] = rows[i]
        target, greedy, top_ids, top_lp = jax.device_get(run(params, tokens_BxT, np.int32(n_vocab)))
        for b, i in enumerate(group):
            n = len(rows[i])
            out[i] = TokenLogprobs(np.concatenate([[np.nan], target[b, :n - 1]]).astype(np.float32),
                                   np.concatenate([[False], greedy[b, :n - 1]]),
                                   np.concatenate([np.zeros((1, K), np.int32), top_ids[b, :n - 1]])[:, :top_n],
                                   np.concatenate([np.full((1, K), np.nan, np.float32), top_lp[b, :n - 1]])[:, :top_n])
    return out


def score_ids(params, cfg: ModelConfig, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
              n_vocab: int | None = None, batch_size: int = 8) -> list[Score]:
    """Sum of log p(continuation | context) and whether greedy decoding would produce it, per pair.

    Each context needs at least one token (callers start an empty one from end-of-text).
    """
    if len(contexts) != len(continuations):
        raise JaxgptError(f"{len(contexts)} contexts but {len(continuations)} continuations; pass one of each per pair")
    for ctx in contexts:
        if not ctx:
            raise JaxgptError("a context is empty; start it from the end-of-text token")
    rows = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    results = token_logprobs(params, cfg, rows, n_vocab, batch_size=batch_size)
    scores = []
    for ctx, r in zip(contexts, results):
        scored = slice(len(ctx), None)
        scores.append(Score(float(np.sum(r.logprob_T[scored], dtype=np.float64)), bool(np.all(r.greedy_T[scored]))))
    return scores
