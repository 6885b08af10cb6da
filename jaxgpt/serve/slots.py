"""Continuous batching on the device: a fixed set of decode slots, each row at its own position.

B slots (the server's max_batch) share one KV cache of B x block_size positions. A request is prefilled
into a free slot on its own (its prompt right-padded to a power-of-two bucket: the padding sits after the
prompt, where the causal mask hides it until decoding overwrites it), then decodes alongside whatever
else is in the slots: `step` runs `chunk` tokens for every live row in one jitted call and returns them.
Between calls the batcher frees finished rows and prefills waiting requests into them, so a request never
waits for another to end. The model runs once per row through `jax.vmap`, which gives each row its own
cache position (positions, causal mask and cache writes are per row) with no change to the model code.

Sampling settings are per-row arrays (temperature, top-k, top-p, repetition penalty, min_new_tokens), so
requests with different settings share the slots; a row's random key is key(seed) folded with its token
count, as in jaxgpt.generate, so a row's tokens do not depend on its slot-mates (nor on which slot it got).
With a prefix cache (jaxgpt.serve.prefix_cache), a finished row's cache is kept under its token ids,
and a prompt whose first half or more is kept tokens (a chat's next turn) copies their keys/values into its
slot and prefills only the rest.

Compiled shapes: one decode chunk, one prefill per prompt bucket; with a prefix cache also one read per
kept-length bucket and one resumed prefill per (kept-length bucket, rest-of-prompt bucket).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.generate import adjust_logits, check_sampling, filter_logits, forward_cached, presence
from jaxgpt.model import init_cache
from jaxgpt.sampling import SamplingParams, prompt_bucket
from jaxgpt.serve.prefix_cache import PrefixCache


class SlotState(NamedTuple):
    """What stays on the device between calls (B slots, L = block_size cache positions)."""

    cache: dict
    logits_BxV: jax.Array  # next-token logits of each row
    seen_BxV: jax.Array  # tokens in each row's prompt + output (repetition penalty)
    pos_B: jax.Array  # cache position of each row's next token
    i_B: jax.Array  # new tokens each row has produced
    done_B: jax.Array  # the row produced end-of-text (or holds no request)


def sample_rows(logits_BxV: jax.Array, keys_B: jax.Array, s: SamplingParams) -> jax.Array:
    """One token per row with per-row settings (fields shaped Bx1); row b draws with keys_B[b] only."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def draw(logits_BxV):
        scaled_BxV = logits_BxV / jnp.maximum(s.temperature, 1e-6)
        filtering_Bx1 = (s.top_k > 0) | (s.top_p < 1)
        # Filter only rows that ask for it: a row's logits never depend on its slot-mates' settings.
        filtered_BxV = jax.lax.cond(jnp.any(filtering_Bx1),
                                    lambda x: jnp.where(filtering_Bx1, filter_logits(x, s.top_k, s.top_p), x),
                                    lambda x: x, scaled_BxV)
        return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)

    drawn_B = jax.lax.cond(jnp.all(s.temperature <= 0), lambda x: greedy_B, draw, logits_BxV)
    return jnp.where(s.temperature[:, 0] <= 0, greedy_B, drawn_B)


def forward_rows(cfg: ModelConfig, params, tokens_BxT, cache, pos_B, n_vocab):
    """forward_cached with each row at its own cache position pos_B[b]: (logits BxTxV, cache)."""

    def one_row(tokens_T, cache_row, pos):
        cache_1 = jax.tree.map(lambda a: a[None], cache_row)
        logits_1xTxV, cache_1 = forward_cached(cfg, params, tokens_T[None], cache_1, pos, None, n_vocab)
        return logits_1xTxV[0], jax.tree.map(lambda a: a[0], cache_1)

    return jax.vmap(one_row)(tokens_BxT, cache, pos_B)


def empty_state(cfg: ModelConfig, n_slots: int) -> SlotState:
    B, V = n_slots, cfg.vocab_size
    return SlotState(init_cache(cfg, B, cfg.block_size), jnp.zeros((B, V), jnp.float32), jnp.zeros((B, V), bool),
                     jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool))


@functools.lru_cache(maxsize=16)
def prefiller(cfg: ModelConfig):
    """Jitted (params, state, slot, prompt_1xT right-padded, length, n_vocab) -> state with the prompt in `slot`."""

    def prefill(params, state: SlotState, slot, prompt_1xT, length, n_vocab):
        T = prompt_1xT.shape[1]
        logits_1xTxV, cache_1 = forward_cached(cfg, params, prompt_1xT, init_cache(cfg, 1, T), 0, None, n_vocab)
        cache = jax.tree.map(lambda big, new: jax.lax.dynamic_update_slice(big, new, (slot, 0, 0, 0)),
                             state.cache, cache_1)
        real_1xT = jnp.where(jnp.arange(T)[None] < length, prompt_1xT, -1)
        return SlotState(cache, state.logits_BxV.at[slot].set(logits_1xTxV[0, length - 1]),
                         state.seen_BxV.at[slot].set(presence(real_1xT, cfg.vocab_size)[0]),
                         state.pos_B.at[slot].set(length), state.i_B.at[slot].set(0),
                         state.done_B.at[slot].set(False))

    return jax.jit(prefill, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def resumer(cfg: ModelConfig):
    """Jitted (params, state, slot, kv row, start, rest_1xT right-padded, length, seen_V, n_vocab) -> state:
    the kept keys/values in `slot`'s positions 0.., then the rest of the prompt prefilled from `start`."""

    def resume(params, state: SlotState, slot, kv, start, rest_1xT, length, seen_V, n_vocab):
        def read_row(big):
            return jax.lax.dynamic_slice(big, (slot, 0, 0, 0), (1, *big.shape[1:]))

        row = jax.tree.map(lambda big, kept: jax.lax.dynamic_update_slice(read_row(big), kept[None], (0, 0, 0, 0)),
                           state.cache, kv)
        logits_1xTxV, row = forward_cached(cfg, params, rest_1xT, row, start, None, n_vocab)
        cache = jax.tree.map(lambda big, r: jax.lax.dynamic_update_slice(big, r, (slot, 0, 0, 0)), state.cache, row)
        return SlotState(cache, state.logits_BxV.at[slot].set(logits_1xTxV[0, length - 1]),
                         state.seen_BxV.at[slot].set(seen_V), state.pos_B.at[slot].set(start + length),
                         state.i_B.at[slot].set(0), state.done_B.at[slot].set(False))

    return jax.jit(resume, donate_argnums=(1,))


@functools.lru_cache(maxsize=64)
def row_reader(cfg: ModelConfig, length: int):
    """Jitted (cache, slot) -> a copy of that slot's first `length` positions (to keep in a PrefixCache)."""
    return jax.jit(lambda cache, slot: jax.tree.map(
        lambda a: jax.lax.dynamic_slice(a, (slot, 0, 0, 0), (1, length, *a.shape[2:]))[0], cache))


@functools.lru_cache(maxsize=16)
def stepper(cfg: ModelConfig, chunk: int):
    """Jitted (params, state, sampling Bx1 fields, seed_B, limit_B, eos_id, n_vocab) -> (state, tokens BxC).

    Up to `chunk` tokens per live row (i < limit, no end-of-text yet); -1 where a row gave no token."""

    def step(params, state: SlotState, sampling: SamplingParams, seed_B, limit_B, eos_id, n_vocab):
        B, L = state.pos_B.shape[0], cfg.block_size
        rows_B = jnp.arange(B)
        keys_B = jax.vmap(jax.random.key)(seed_B)

        def cond(carry):
            k, st, _ = carry
            return (k < chunk) & jnp.any(~st.done_B & (st.i_B < limit_B))

        def body(carry):
            k, st, out_BxC = carry
            live_B = ~st.done_B & (st.i_B < limit_B)
            logits_BxV = adjust_logits(st.logits_BxV, st.seen_BxV, None, None, st.i_B[:, None], sampling, eos_id, 0)
            step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, st.i_B)
            token_B = sample_rows(logits_BxV, step_keys_B, sampling)
            ended_B = live_B & (token_B == eos_id)
            emitted_B = live_B & ~ended_B
            out_BxC = out_BxC.at[:, k].set(jnp.where(emitted_B, token_B, -1))
            seen_BxV = st.seen_BxV.at[rows_B, jnp.where(emitted_B, token_B, cfg.vocab_size)].set(True, mode="drop")
            write_B = jnp.minimum(st.pos_B, L - 1)  # a finished row's write lands in its own last slot, unused
            logits_Bx1xV, cache = forward_rows(cfg, params, token_B[:, None], st.cache, write_B, n_vocab)
            logits_BxV = jnp.where(emitted_B[:, None], logits_Bx1xV[:, 0], st.logits_BxV)
            st = SlotState(cache, logits_BxV, seen_BxV, st.pos_B + emitted_B, st.i_B + emitted_B,
                           st.done_B | ended_B)
            return k + 1, st, out_BxC

        out_BxC = jnp.full((B, chunk), -1, jnp.int32)
        _, state, out_BxC = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out_BxC))
        return state, out_BxC

    return jax.jit(step, donate_argnums=(1,))


class Slots:
    """B decode slots of one model: `admit` a prompt into a free slot, `step` every live row, `release` a slot."""

    def __init__(self, params, cfg: ModelConfig, n_slots: int, chunk: int, eos_id: int, n_vocab: int,
                 prefix_cache_bytes: int = 0):
        self.params, self.cfg, self.chunk = params, cfg, chunk
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.eos_id, self.n_vocab = np.int32(eos_id), np.int32(n_vocab)
        self.state = empty_state(cfg, n_slots)
        self.free = list(range(n_slots))
        self.limit_B = np.zeros(n_slots, np.int32)  # 0 for an empty slot: it never runs
        self.seed_B = np.zeros(n_slots, np.uint32)
        self.settings_Bx5 = np.tile(np.asarray(SamplingParams(), np.float32), (n_slots, 1))

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether a request fits one slot (else the window must slide: the caller runs it another way)."""
        return prompt_len + max_new_tokens <= self.cfg.block_size

    def admit(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams, seed: int) -> int:
        """Prefill the prompt into a free slot (there must be one) and return the slot."""
        check_sampling(sampling)
        if not self.fits(len(prompt_ids), max_new_tokens):
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the context "
                             f"of {self.cfg.block_size} tokens")
        slot = self.free[0]
        if not self._resume(slot, prompt_ids):
            self.state = prefiller(self.cfg)(self.params, self.state, np.int32(slot), self._padded(prompt_ids),
                                             np.int32(len(prompt_ids)), self.n_vocab)
        self.free.pop(0)
        self.limit_B[slot], self.seed_B[slot] = max_new_tokens, seed % 2**32
        self.settings_Bx5[slot] = np.asarray(sampling, np.float32)
        return slot

    def _padded(self, ids: list[int]) -> np.ndarray:
        """1xT: ids right-padded to their power-of-two bucket (at most the context)."""
        ids_1xT = np.full((1, min(prompt_bucket(len(ids)), self.cfg.block_size)), self.eos_id, np.int32)
        ids_1xT[0, :len(ids)] = ids
        return ids_1xT

    def _resume(self, slot: int, prompt_ids: list[int]) -> bool:
        """Prefill from the prefix cache's longest match, if any fits; False: prefill it all."""
        if self.prefix is None:
            return False
        entry, kept = self.prefix.find(prompt_ids)
        kept = min(kept, len(prompt_ids) - 1)  # the last prompt token always runs: its logits start the reply
        if entry is None or 2 * kept < len(prompt_ids):  # copying a whole kept row costs more than a short prefill
            return False
        rest_1xT = self._padded(prompt_ids[kept:])
        if kept + rest_1xT.shape[1] > self.cfg.block_size:  # the padded rest would run past the cache
            return False
        seen_V = np.zeros(self.cfg.vocab_size, bool)
        seen_V[prompt_ids] = True
        self.state = resumer(self.cfg)(self.params, self.state, np.int32(slot), entry.kv, np.int32(kept), rest_1xT,
                                       np.int32(len(prompt_ids) - kept), seen_V, self.n_vocab)
        self.prefix.stats["prefix_cache_hits"] += 1
        self.prefix.stats["prefix_cache_tokens_reused"] += kept
        return True

    def release(self, slot: int, ids: list[int] | None = None) -> None:
        """Free the slot; `ids` (the row's prompt + every token it produced) keeps its cache in the prefix cache."""
        if ids and self.prefix is not None:
            length = min(prompt_bucket(len(ids)), self.cfg.block_size)
            self.prefix.put(ids, row_reader(self.cfg, length)(self.state.cache, np.int32(slot)))
        self.limit_B[slot] = 0
        self.free.append(slot)

    def step(self) -> tuple[list[list[int]], list[bool]]:
        """Up to `chunk` new tokens for every slot, and whether each slot's row produced end-of-text."""
        s = self.settings_Bx5
        sampling = SamplingParams(s[:, 0:1], s[:, 1:2].astype(np.int32), s[:, 2:3], s[:, 3:4],
                                  s[:, 4:5].astype(np.int32))
        self.state, out_BxC = stepper(self.cfg, self.chunk)(self.params, self.state, sampling, self.seed_B,
                                                            self.limit_B, self.eos_id, self.n_vocab)
        rows = np.asarray(out_BxC).tolist()
        return [[t for t in row if t >= 0] for row in rows], np.asarray(self.state.done_B).tolist()
