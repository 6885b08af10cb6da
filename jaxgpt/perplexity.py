"""Sliding-window perplexity of a long text (HF's strided recipe).

Windows of at most `window` (default block_size) tokens start every `stride` tokens; each window scores
only the tokens not scored by an earlier window, so every token after the first is scored exactly once,
with between window - stride and window - 1 tokens of left context (less at the very start). With
stride = window the windows do not overlap and this is the plain chunked loss (a window's first token is
then not scored: it has no context inside its window). Windows are right-padded to a power-of-two
length and run `batch_size` at a time, so a whole text costs one or two compiles.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import prompt_bucket
from jaxgpt.model import GPT


class Window(NamedTuple):
    begin: int  # first token the model sees
    end: int  # one past the last
    first_scored: int  # targets first_scored .. end-1 are scored here


class PerplexityResult(NamedTuple):
    perplexity: float
    nll: float  # mean negative log-likelihood, nats per scored token
    n_scored: int
    windows: list[Window]
    nll_N: np.ndarray  # per token (NaN where not scored)
    context_N: np.ndarray  # tokens of left context each scored token had (-1 where not scored)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    if not 0 < stride <= window:
        raise JaxgptError(f"stride must be in [1, window={window}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@functools.lru_cache(maxsize=16)
def _window_nll(cfg: ModelConfig):
    def run(params, tokens_BxT, n_vocab):
        logits_BxTxV, _ = GPT(cfg).apply({"params": params}, tokens_BxT)
        logits_BxTxV = jnp.where(jnp.arange(cfg.vocab_size) < n_vocab, logits_BxTxV, -jnp.inf)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)
        nll_BxT1 = -jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
        return jnp.pad(nll_BxT1, ((0, 0), (1, 0)))  # nll_BxT[:, t]: loss of token t given tokens < t

    return jax.jit(run)


def perplexity(params, cfg: ModelConfig, ids: list[int], stride: int | None = None, window: int | None = None,
               n_vocab: int | None = None, batch_size: int = 4) -> PerplexityResult:
    """Sliding-window perplexity of `ids` (see the module docstring)."""
    window = window or cfg.block_size
    stride = stride or window
    if window > cfg.block_size:
        raise JaxgptError(f"window ({window}) exceeds the model's context of {cfg.block_size} tokens; lower "
                          "--window (window=) or leave it out to use the whole context")
    if len(ids) < 2:
        raise JaxgptError(f"need at least 2 tokens to score, got {len(ids)}")
    windows = sliding_windows(len(ids), window, stride)
    ids_N = np.asarray(ids, np.int32)
    nll_N = np.full(len(ids), np.nan)
    context_N = np.full(len(ids), -1)
    run = _window_nll(cfg)
    by_length: dict[int, list[Window]] = {}
    for w in windows:  # windows of one padded length run together
        by_length.setdefault(min(prompt_bucket(w.end - w.begin), window), []).append(w)
    for T, group in by_length.items():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            tokens_BxT = np.zeros((batch_size, T), np.int32)  # a fixed batch shape: padding rows are ignored
            for b, w in enumerate(batch):
                tokens_BxT[b, :w.end - w.begin] = ids_N[w.begin:w.end]
            nll_BxT = np.asarray(run(params, tokens_BxT, np.int32(n_vocab or cfg.vocab_size)))
            for b, w in enumerate(batch):
                nll_N[w.first_scored:w.end] = nll_BxT[b, w.first_scored - w.begin:w.end - w.begin]
                context_N[w.first_scored:w.end] = np.arange(w.first_scored, w.end) - w.begin
    scored = ~np.isnan(nll_N)
    mean = float(nll_N[scored].mean())
    return PerplexityResult(math.exp(mean), mean, int(scored.sum()), windows, nll_N, context_N)
