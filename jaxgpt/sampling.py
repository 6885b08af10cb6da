"""Sampling settings, per-row random keys, prompt padding and scoring limits, with no model code: an
exported artifact and its server use them without Flax (jaxgpt.generate and jaxgpt.scoring use the same)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import JaxgptError

MAX_TOP = 20  # the most alternatives per position a caller may ask for (OpenAI allows 20)


class SamplingParams(NamedTuple):
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the sequence
    min_new_tokens: int = 0  # end-of-text is banned before this many new tokens


def prompt_bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def row_keys(seed: int | Sequence[int], batch: int) -> jax.Array:
    """One key per row: a list of seeds gives row b key(seed[b]); one seed gives fold_in(key(seed), b)."""
    if isinstance(seed, (int, np.integer)):
        return jax.vmap(lambda b: jax.random.fold_in(jax.random.key(int(seed)), b))(jnp.arange(batch))
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise JaxgptError(f"got {len(seeds)} seeds for {batch} prompts; pass one seed or one per prompt")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def left_pad(prompts: list[list[int]], pad_id: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BxP, start_B): each prompt right-aligned in a row of length `bucket`."""
    tokens_BxP = np.full((len(prompts), bucket), pad_id, np.int32)
    start_B = np.zeros(len(prompts), np.int32)
    for b, ids in enumerate(prompts):
        tokens_BxP[b, bucket - len(ids):] = ids
        start_B[b] = bucket - len(ids)
    return tokens_BxP, start_B


def cut_at_eos(row: list[int], eos_id: int) -> list[int]:
    """A row's tokens before its first end-of-text."""
    return row[:row.index(eos_id)] if eos_id in row else row
