"""Beam search: K hypotheses per prompt, decoded in one jitted `lax.while_loop` over a B*K-row KV cache.

Each step scores every (beam, token) pair by summed log-probability and keeps the K best per prompt,
reordering the cache rows to follow their parents. A beam that has emitted end-of-text stays in the beam
with a frozen score (its only continuation is free padding). At the end the beam with the best
`score / length ** length_penalty` wins (length counts new tokens, end-of-text included). Deterministic:
temperature/top-k/top-p do not apply. With num_beams=1 this is greedy decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.compile_options import decode_jit
from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import cut_at_eos, forward_cached, left_pad, prompt_bucket
from jaxgpt.model import init_cache


@functools.lru_cache(maxsize=32)
def _beam_decoder(cfg: ModelConfig, max_new_tokens: int, num_beams: int):
    K, N, V = num_beams, max_new_tokens, cfg.vocab_size

    def decode(params, prompt_BxP, start_B, eos_id, n_vocab, min_new_tokens, length_penalty):
        B, P = prompt_BxP.shape
        start_R = jnp.repeat(start_B, K)  # R = B*K rows, beams of a prompt adjacent
        logits_RxPxV, cache = forward_cached(cfg, params, jnp.repeat(prompt_BxP, K, axis=0),
                                             init_cache(cfg, B * K, P + N), 0, start_R, n_vocab)
        # Only beam 0 is live at first, so the first step does not pick K copies of the same token.
        score_BxK = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf)[None].repeat(B, 0)
        state = (jnp.int32(0), cache, logits_RxPxV[:, -1], score_BxK, jnp.full((B, K, N), eos_id, jnp.int32),
                 jnp.zeros((B, K), bool), jnp.zeros((B, K), jnp.int32))

        def cond(st):
            return (st[0] < N) & ~jnp.all(st[5])

        def body(st):
            i, cache, logits_RxV, score_BxK, out_BxKxN, done_BxK, len_BxK = st
            logp_BxKxV = jax.nn.log_softmax(logits_RxV, axis=-1).reshape(B, K, V)
            logp_BxKxV = jnp.where((i < min_new_tokens) & (jnp.arange(V) == eos_id), -jnp.inf, logp_BxKxV)
            # A finished beam continues only through slot 0, at no cost; its token is replaced by eos below.
            frozen_V = jnp.where(jnp.arange(V) == 0, 0.0, -jnp.inf)
            logp_BxKxV = jnp.where(done_BxK[..., None], frozen_V, logp_BxKxV)
            cand_BxKV = (score_BxK[..., None] + logp_BxKxV).reshape(B, K * V)
            score_BxK, flat_BxK = jax.lax.top_k(cand_BxKV, K)
            parent_BxK, token_BxK = flat_BxK // V, (flat_BxK % V).astype(jnp.int32)
            was_done_BxK = jnp.take_along_axis(done_BxK, parent_BxK, axis=1)
            token_BxK = jnp.where(was_done_BxK, eos_id, token_BxK)
            len_BxK = jnp.take_along_axis(len_BxK, parent_BxK, axis=1) + (~was_done_BxK).astype(jnp.int32)
            out_BxKxN = jnp.take_along_axis(out_BxKxN, parent_BxK[..., None], axis=1)
            out_BxKxN = jax.lax.dynamic_update_slice(out_BxKxN, token_BxK[..., None], (0, 0, i))
            done_BxK = was_done_BxK | (token_BxK == eos_id)
            rows_R = (jnp.arange(B)[:, None] * K + parent_BxK).reshape(-1)
            cache = jax.tree.map(lambda c: c[rows_R], cache)  # each beam inherits its parent's keys/values
            logits_Rx1xV, cache = forward_cached(cfg, params, token_BxK.reshape(-1, 1), cache, P + i, start_R,
                                                 n_vocab)
            return i + 1, cache, logits_Rx1xV[:, 0], score_BxK, out_BxKxN, done_BxK, len_BxK

        _, _, _, score_BxK, out_BxKxN, _, len_BxK = jax.lax.while_loop(cond, body, state)
        final_BxK = score_BxK / jnp.maximum(len_BxK, 1).astype(jnp.float32) ** length_penalty
        best_B = jnp.argmax(final_BxK, axis=1)
        return jnp.take_along_axis(out_BxKxN, best_B[:, None, None], axis=1)[:, 0]

    return decode_jit(decode)


def beam_search_ids(params, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, *, num_beams: int,
                    eos_id: int, n_vocab: int | None = None, min_new_tokens: int = 0,
                    length_penalty: float = 1.0) -> list[list[int]]:
    """The best beam's new token ids for each prompt, cut at the first end-of-text."""
    if num_beams < 1:
        raise JaxgptError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens <= 0:
        raise JaxgptError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if min_new_tokens < 0:
        raise JaxgptError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    prompts = [list(p) if len(p) else [eos_id] for p in prompts]
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.block_size:
        raise JaxgptError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context of {cfg.block_size} tokens and beam search does not slide the window; lower "
                          "max_new_tokens (--max-new-tokens) or shorten the prompt")
    tokens_BxP, start_B = left_pad(prompts, eos_id, min(prompt_bucket(longest), cfg.block_size - max_new_tokens))
    out_BxN = _beam_decoder(cfg, max_new_tokens, num_beams)(
        params, tokens_BxP, start_B, np.int32(eos_id), np.int32(n_vocab or cfg.vocab_size), np.int32(min_new_tokens),
        np.float32(length_penalty))
    return [cut_at_eos(row, eos_id) for row in np.asarray(out_BxN).tolist()]
