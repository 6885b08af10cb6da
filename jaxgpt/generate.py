"""Sampling with a KV cache: one prefill, then the whole decode inside one jitted `lax.while_loop`.

Prompts are left-padded to a power-of-two bucket so rows stay aligned in the cache (`start_B` marks the
padding) and a new prompt length within a bucket reuses the compiled function. Temperature, top-k,
top-p, the seed and the end-of-text id are traced values: changing them never recompiles. One
compilation per (batch, prompt bucket, max_new_tokens).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.model import GPT, init_cache


class SamplingParams(NamedTuple):
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off


def prompt_bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def filter_logits(logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (0 / 1.0 switch them off)."""
    V = logits_BxV.shape[-1]
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth_B1 = jnp.take_along_axis(sorted_BxV, jnp.broadcast_to(k - 1, (logits_BxV.shape[0], 1)), axis=-1)
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
    sorted_BxV = jnp.where(sorted_BxV < kth_B1, -jnp.inf, sorted_BxV)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = (mass_before_BxV < top_p) | (jnp.arange(V) == 0)  # the top token always survives
    threshold_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV < threshold_B1, -jnp.inf, logits_BxV)


def sample_token(logits_BxV: jax.Array, rng: jax.Array, sampling: SamplingParams) -> jax.Array:
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV / jnp.maximum(sampling.temperature, 1e-6)
    filtered_BxV = filter_logits(scaled_BxV, sampling.top_k, sampling.top_p)
    sampled_B = jax.random.categorical(rng, filtered_BxV, axis=-1)
    return jnp.where(sampling.temperature <= 0, greedy_B, sampled_B).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _decoder(cfg: ModelConfig, max_new_tokens: int):
    model = GPT(cfg)

    def decode(params, prompt_BxP, start_B, rng, sampling: SamplingParams, eos_id, n_vocab):
        B, P = prompt_BxP.shape
        cache = init_cache(cfg, B, P + max_new_tokens)
        valid_V = jnp.arange(cfg.vocab_size) < n_vocab  # padded vocabulary rows are never sampled

        def forward(tokens_BxT, cache, index):
            logits_BxTxV, cache = model.apply({"params": params}, tokens_BxT, cache=cache, cache_index=index,
                                              start_B=start_B)
            return jnp.where(valid_V, logits_BxTxV[:, -1], -jnp.inf), cache

        logits_BxV, cache = forward(prompt_BxP, cache, 0)
        out_BxN = jnp.full((B, max_new_tokens), eos_id, jnp.int32)

        def cond(carry):
            i, _, _, _, done_B = carry
            return (i < max_new_tokens) & ~jnp.all(done_B)

        def body(carry):
            i, cache, logits_BxV, out_BxN, done_B = carry
            token_B = sample_token(logits_BxV, jax.random.fold_in(rng, i), sampling)
            token_B = jnp.where(done_B, eos_id, token_B)
            out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, i))
            done_B = done_B | (token_B == eos_id)
            logits_BxV, cache = forward(token_B[:, None], cache, P + i)
            return i + 1, cache, logits_BxV, out_BxN, done_B

        carry = (jnp.int32(0), cache, logits_BxV, out_BxN, jnp.zeros((B,), bool))
        _, _, _, out_BxN, _ = jax.lax.while_loop(cond, body, carry)
        return out_BxN

    return jax.jit(decode)


def left_pad(prompts: list[list[int]], pad_id: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BxP, start_B): each prompt right-aligned in a row of length `bucket`."""
    tokens_BxP = np.full((len(prompts), bucket), pad_id, np.int32)
    start_B = np.zeros(len(prompts), np.int32)
    for b, ids in enumerate(prompts):
        tokens_BxP[b, bucket - len(ids):] = ids
        start_B[b] = bucket - len(ids)
    return tokens_BxP, start_B


def generate_ids(params, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int,
                 n_vocab: int | None = None, sampling: SamplingParams = SamplingParams(), seed: int = 0
                 ) -> list[list[int]]:
    """New token ids for each prompt, cut at the first end-of-text."""
    if max_new_tokens <= 0:
        raise JaxgptError(f"max_new_tokens must be positive, got {max_new_tokens}")
    prompts = [list(p) if len(p) else [eos_id] for p in prompts]  # an empty prompt starts from end-of-text
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.block_size:
        raise JaxgptError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context of {cfg.block_size} tokens; shorten the prompt or lower max_new_tokens")
    bucket = min(prompt_bucket(longest), cfg.block_size - max_new_tokens)
    tokens_BxP, start_B = left_pad(prompts, eos_id, bucket)
    sampling = SamplingParams(*(np.asarray(v, np.float32 if i != 1 else np.int32) for i, v in enumerate(sampling)))
    out_BxN = _decoder(cfg, max_new_tokens)(params, tokens_BxP, start_B, jax.random.key(seed), sampling,
                                            np.int32(eos_id), np.int32(n_vocab or cfg.vocab_size))
    results = []
    for row in np.asarray(out_BxN).tolist():
        results.append(row[:row.index(eos_id)] if eos_id in row else row)
    return results
