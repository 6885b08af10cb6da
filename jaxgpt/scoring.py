"""Log-probabilities of given tokens from a live model: `LanguageModel.score` and the server's `logprobs`/`echo`.

One full forward pass per row (the same `GPT.apply` as `LanguageModel.logits`), then a float32
log-softmax over the real vocabulary (padding ids of a padded embedding table are excluded). Batching,
padding and the result types live in jaxgpt.score_rows (shared with exported artifacts, whose scoring
program `jaxgpt export` traces from `logprob_arrays`); a batch of texts costs a compile per length bucket.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.model import GPT
from jaxgpt.score_rows import Score, TokenLogprobs, batched_logprobs, check_rows, continuation_scores

__all__ = ["Score", "TokenLogprobs", "logprob_arrays", "score_ids", "token_logprobs"]


def _top_bucket(top_n: int) -> int:
    """Compile top-k for a few sizes only (0, 1, 2, 4, ..., 32)."""
    return 0 if top_n <= 0 else 1 << (top_n - 1).bit_length()


def logprob_arrays(cfg: ModelConfig, params, tokens_BxT, n_vocab, top_k: int):
    """(log p, is argmax, top-k ids, top-k log p) of tokens 1..T-1 of each row, all float32 (top_k static)."""
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


@functools.lru_cache(maxsize=32)
def _scorer(cfg: ModelConfig, top_k: int):
    return jax.jit(functools.partial(logprob_arrays, cfg, top_k=top_k))


def token_logprobs(params, cfg: ModelConfig, rows: Sequence[Sequence[int]], n_vocab: int | None = None,
                   top_n: int = 0, batch_size: int = 8) -> list[TokenLogprobs]:
    """Per-token log-probabilities (and the `top_n` best alternatives) of each row of token ids."""
    n_vocab = n_vocab or cfg.vocab_size
    check_rows(rows, cfg.block_size, top_n, n_vocab)
    run = _scorer(cfg, min(_top_bucket(top_n), n_vocab))
    return batched_logprobs(lambda tokens_BxT: jax.device_get(run(params, tokens_BxT, np.int32(n_vocab))), rows,
                            cfg.block_size, top_n, batch_size, lambda n: 1 << (n - 1).bit_length())


def score_ids(params, cfg: ModelConfig, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
              n_vocab: int | None = None, batch_size: int = 8) -> list[Score]:
    """Sum of log p(continuation | context) and whether greedy decoding would produce it, per pair.

    Each context needs at least one token (callers start an empty one from end-of-text).
    """
    return continuation_scores(contexts, continuations,
                               lambda rows: token_logprobs(params, cfg, rows, n_vocab, batch_size=batch_size))
