"""Continuous batching on the device: a fixed set of decode slots, each row with its own start.

B slots (the server's max_batch) share one KV cache of B x 2L positions (L = block_size) and one write
pointer `cur`: every decode step writes each row's token at slot `cur`. Row b's text lies in slots
[start_b, cur), so its positions are slot - start_b and the model's left-padding mask (start_B) hides
everything before it: the model's batched cached forward, unchanged, decodes rows of any lengths together.
A request is prefilled into a free slot so that its prompt ends at `cur` (right-padded to a power-of-two
bucket: the padding lies past `cur`, where the causal mask hides it until decoding overwrites it); then it
decodes alongside whatever else is in the slots: `step` runs `chunk` tokens for every live row in one
jitted call. Between calls the batcher frees finished rows and prefills waiting requests into them, so a
request never waits for another to end. `cur` starts at L, and goes back to L when a request arrives at
empty slots; when a new request would run past 2L, every row shifts left by cur - L (a live row spans at
most L slots, so none loses text), and cur is L again.

Sampling settings are per-row arrays (temperature, top-k, top-p, repetition penalty, min_new_tokens), so
requests with different settings share the slots; a row's random key is key(seed) folded with its token
count, as in jaxgpt.generate, so a row's tokens do not depend on its slot-mates (nor on which slot it got).

With a prefix cache (jaxgpt.serve.prefix_cache), a finished row's cache is kept under its token ids,
and a prompt whose first half or more is kept tokens (a chat's next turn) copies their keys/values into its
slot and prefills only the rest, where that rest pads to a smaller bucket than the whole prompt.

A decode chunk attends over a window of the cache, from the earliest live row's first slot to the chunk's
last write, rounded up to a power of two: a step costs what the rows in the slots need. A request takes the
lowest free slot, and a step runs slot 0 alone when no other slot is taken, so one request alone decodes at
batch 1 (a row count per occupancy would multiply the compiled shapes, each first met under load). Idle
rows never draw from the vocabulary (a draw per row per token costs more than a tiny model's forward).

Compiled shapes: one decode chunk per window bucket at 1 and at B rows, one shift, one prefill per prompt
bucket; with a prefix cache also one read per kept-length bucket and one resumed prefill per (kept-length,
rest-of-prompt) bucket. A request repeated at idle slots compiles nothing: it runs the same shapes again.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.compile_options import decode_jit
from jaxgpt.config import ModelConfig
from jaxgpt.generate import adjust_logits, check_sampling, filter_logits, forward_cached, presence
from jaxgpt.model import init_cache
from jaxgpt.sampling import SamplingParams, prompt_bucket
from jaxgpt.serve.prefix_cache import PrefixCache


class SlotState(NamedTuple):
    """What stays on the device between calls (B slots, 2L cache slots per row)."""

    cache: dict
    logits_BxV: jax.Array  # next-token logits of each row
    seen_BxV: jax.Array  # tokens in each row's prompt + output (repetition penalty)
    start_B: jax.Array  # the cache slot of each row's first token
    i_B: jax.Array  # new tokens each row has produced
    done_B: jax.Array  # the row produced end-of-text (or holds no request)
    cur: jax.Array  # the cache slot every row writes its next token to


def sample_rows(logits_BxV: jax.Array, keys_B: jax.Array, s: SamplingParams, live_B: jax.Array) -> jax.Array:
    """One token per row with per-row settings (fields shaped Bx1); row b draws with keys_B[b] only. Rows not
    live take the greedy token (the caller discards it): idle slots never cost a draw over the vocabulary."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    s = s._replace(temperature=jnp.where(live_B[:, None], s.temperature, 0.0))

    def draw(logits_BxV):
        scaled_BxV = logits_BxV / jnp.maximum(s.temperature, 1e-6)
        filtering_Bx1 = ((s.top_k > 0) | (s.top_p < 1)) & live_B[:, None]
        # Filter only rows that ask for it: a row's logits never depend on its slot-mates' settings.
        filtered_BxV = jax.lax.cond(jnp.any(filtering_Bx1),
                                    lambda x: jnp.where(filtering_Bx1, filter_logits(x, s.top_k, s.top_p), x),
                                    lambda x: x, scaled_BxV)
        return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)

    drawn_B = jax.lax.cond(jnp.all(s.temperature <= 0), lambda x: greedy_B, draw, logits_BxV)
    return jnp.where(s.temperature[:, 0] <= 0, greedy_B, drawn_B)


def empty_state(cfg: ModelConfig, n_slots: int) -> SlotState:
    B, V, L = n_slots, cfg.vocab_size, cfg.block_size
    return SlotState(init_cache(cfg, B, 2 * L), jnp.zeros((B, V), jnp.float32), jnp.zeros((B, V), bool),
                     jnp.full((B,), L, jnp.int32), jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool), jnp.int32(L))


def _with_row(state: SlotState, slot, cache, logits_V, seen_V, start) -> SlotState:
    """The state with a freshly prefilled row in `slot`."""
    return SlotState(cache, state.logits_BxV.at[slot].set(logits_V), state.seen_BxV.at[slot].set(seen_V),
                     state.start_B.at[slot].set(start), state.i_B.at[slot].set(0), state.done_B.at[slot].set(False),
                     state.cur)


@functools.lru_cache(maxsize=16)
def prefiller(cfg: ModelConfig):
    """Jitted (params, state, slot, prompt_1xT right-padded, length, n_vocab) -> state with the prompt in `slot`,
    ending at cur."""

    def prefill(params, state: SlotState, slot, prompt_1xT, length, n_vocab):
        T = prompt_1xT.shape[1]
        logits_1xTxV, cache_1 = forward_cached(cfg, params, prompt_1xT, init_cache(cfg, 1, T), 0, None, n_vocab)
        start = state.cur - length
        cache = jax.tree.map(lambda big, new: jax.lax.dynamic_update_slice(big, new, (slot, start, 0, 0)),
                             state.cache, cache_1)
        real_1xT = jnp.where(jnp.arange(T)[None] < length, prompt_1xT, -1)
        return _with_row(state, slot, cache, logits_1xTxV[0, length - 1], presence(real_1xT, cfg.vocab_size)[0],
                         start)

    return decode_jit(prefill, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def resumer(cfg: ModelConfig):
    """Jitted (params, state, slot, kv row, kept, rest_1xT right-padded, length, seen_V, n_vocab) -> state: the
    kept keys/values (positions 0..kept-1 of `kv`) then the rest of the prompt, ending at cur, in `slot`."""

    def resume(params, state: SlotState, slot, kv, kept, rest_1xT, length, seen_V, n_vocab):
        start = state.cur - kept - length

        def row_with_kept(big, kept_ExHxK):
            row = jax.lax.dynamic_slice(big, (slot, 0, 0, 0), (1, *big.shape[1:]))
            return jax.lax.dynamic_update_slice(row, kept_ExHxK[None], (0, start, 0, 0))

        row = jax.tree.map(row_with_kept, state.cache, kv)
        logits_1xTxV, row = forward_cached(cfg, params, rest_1xT, row, start + kept, start[None], n_vocab)
        cache = jax.tree.map(lambda big, r: jax.lax.dynamic_update_slice(big, r, (slot, 0, 0, 0)), state.cache, row)
        return _with_row(state, slot, cache, logits_1xTxV[0, length - 1], seen_V, start)

    return decode_jit(resume, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def shifter(cfg: ModelConfig):
    """Jitted (state, d) -> every row moved d slots left (what falls off the left end is no row's text)."""

    def shift(state: SlotState, d):
        cache = jax.tree.map(lambda a: jnp.roll(a, -d, axis=1), state.cache)
        return state._replace(cache=cache, start_B=state.start_B - d, cur=state.cur - d)

    return jax.jit(shift, donate_argnums=(0,))


@functools.lru_cache(maxsize=64)
def row_reader(cfg: ModelConfig, length: int):
    """Jitted (cache, slot, start) -> a copy of `length` slots of that row from `start` (to keep in a PrefixCache)."""

    def read(cache, slot, start):
        def one(a):
            row_SxHxK = jax.lax.dynamic_slice(a, (slot, 0, 0, 0), (1, *a.shape[1:]))[0]
            return jnp.roll(row_SxHxK, -start, axis=0)[:length]

        return jax.tree.map(one, cache)

    return jax.jit(read)


@functools.lru_cache(maxsize=128)
def stepper(cfg: ModelConfig, chunk: int, window: int, rows: int):
    """Jitted (params, state, lo, sampling Rx1 fields, seed_R, limit_R, eos_id, n_vocab) -> (state, tokens RxC).

    Up to `chunk` tokens per live row among the first `rows` slots (i < limit, no end-of-text yet); -1 where a
    row gave no token; slots from `rows` on must hold no request. The steps attend over cache slots
    [lo, lo + window) only, which must hold every live row's text and the chunk's writes: attention, cache
    updates and the vocabulary-wide work cost what the live rows need, not the whole cache."""

    def step(params, state: SlotState, lo, sampling: SamplingParams, seed_R, limit_R, eos_id, n_vocab):
        R = rows
        rows_R = jnp.arange(R)
        keys_R = jax.vmap(jax.random.key)(seed_R)

        def cond(carry):
            k, st, _ = carry
            return (k < chunk) & jnp.any(~st.done_B & (st.i_B < limit_R))

        def body(carry):
            k, st, out_RxC = carry
            live_R = ~st.done_B & (st.i_B < limit_R)
            logits_RxV = adjust_logits(st.logits_BxV, st.seen_BxV, None, None, st.i_B[:, None], sampling, eos_id, 0)
            step_keys_R = jax.vmap(jax.random.fold_in)(keys_R, st.i_B)
            token_R = sample_rows(logits_RxV, step_keys_R, sampling, live_R)
            ended_R = live_R & (token_R == eos_id)
            emitted_R = live_R & ~ended_R
            out_RxC = out_RxC.at[:, k].set(jnp.where(emitted_R, token_R, -1))
            seen_RxV = st.seen_BxV.at[rows_R, jnp.where(emitted_R, token_R, cfg.vocab_size)].set(True, mode="drop")
            # Every row writes at cur; a row that gave no token writes there too, past its own text.
            logits_Rx1xV, cache = forward_cached(cfg, params, token_R[:, None], st.cache, st.cur - lo,
                                                 st.start_B - lo, n_vocab)
            logits_RxV = jnp.where(emitted_R[:, None], logits_Rx1xV[:, 0], st.logits_BxV)
            st = SlotState(cache, logits_RxV, seen_RxV, st.start_B, st.i_B + emitted_R, st.done_B | ended_R,
                           st.cur + 1)
            return k + 1, st, out_RxC

        def in_window(a):
            return jax.lax.dynamic_slice(a, (0, lo, 0, 0), (R, window, *a.shape[2:]))

        # The first R slots, their cache cut to the window: the loop carries only what it works on.
        part = SlotState(jax.tree.map(in_window, state.cache), *(a[:R] for a in state[1:-1]), state.cur)
        out_RxC = jnp.full((R, chunk), -1, jnp.int32)
        _, part, out_RxC = jax.lax.while_loop(cond, body, (jnp.int32(0), part, out_RxC))
        cache = jax.tree.map(lambda a, w: jax.lax.dynamic_update_slice(a, w, (0, lo, 0, 0)), state.cache,
                             part.cache)
        return SlotState(cache, *(a.at[:R].set(p) for a, p in zip(state[1:-1], part[1:-1])), part.cur), out_RxC

    return decode_jit(step, donate_argnums=(1,))


class Slots:
    """B decode slots of one model: `admit` a prompt into a free slot, `step` every live row, `release` a slot."""

    def __init__(self, params, cfg: ModelConfig, n_slots: int, chunk: int, eos_id: int, n_vocab: int,
                 prefix_cache_bytes: int = 0):
        self.params, self.cfg, self.chunk = params, cfg, chunk
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.eos_id, self.n_vocab = np.int32(eos_id), np.int32(n_vocab)
        # Committed to the device, as every later state is (else the first calls compile twice), and shifted by 0
        # to compile the shift now: the first real one comes under load, when the slots are busy.
        self.state = shifter(cfg)(jax.device_put(empty_state(cfg, n_slots), jax.devices()[0]), np.int32(0))
        self.cur = cfg.block_size  # host copies of state.cur and state.start_B
        self.start_B = np.full(n_slots, cfg.block_size, np.int64)
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
        n, L = len(prompt_ids), self.cfg.block_size
        if not self.fits(n, max_new_tokens):
            raise ValueError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds the context of {L} tokens")
        slot = min(self.free)  # the lowest free slot: a request alone is in slot 0, which decodes at batch 1
        entry, kept = self._reusable(prompt_ids)
        padded_1xT = self._padded(prompt_ids[kept:])
        # The furthest slot this row writes: its prompt's padding, a kept row's copy, its last token.
        written = max(kept + padded_1xT.shape[1], entry.length if entry else 0, n + max_new_tokens)
        if len(self.free) == len(self.limit_B):  # no row to keep: start again at L, with no shift to run
            self.cur = L
            self.state = self.state._replace(cur=jax.device_put(np.int32(L), self.state.cur.sharding))
        elif self.cur - n + written > 2 * L:  # shift every row left: cur is L again, and everything fits
            self.state = shifter(self.cfg)(self.state, np.int32(self.cur - L))
            self.start_B -= self.cur - L
            self.cur = L
        if entry is None:
            self.state = prefiller(self.cfg)(self.params, self.state, np.int32(slot), padded_1xT, np.int32(n),
                                             self.n_vocab)
        else:
            seen_V = np.zeros(self.cfg.vocab_size, bool)
            seen_V[prompt_ids] = True
            self.state = resumer(self.cfg)(self.params, self.state, np.int32(slot), entry.kv, np.int32(kept),
                                           padded_1xT, np.int32(n - kept), seen_V, self.n_vocab)
            self.prefix.stats["prefix_cache_hits"] += 1
            self.prefix.stats["prefix_cache_tokens_reused"] += kept
        self.free.remove(slot)
        self.start_B[slot] = self.cur - n
        self.limit_B[slot], self.seed_B[slot] = max_new_tokens, seed % 2**32
        self.settings_Bx5[slot] = np.asarray(sampling, np.float32)
        return slot

    def _padded(self, ids: list[int]) -> np.ndarray:
        """1xT: ids right-padded to their power-of-two bucket (at most the context)."""
        ids_1xT = np.full((1, min(prompt_bucket(len(ids)), self.cfg.block_size)), self.eos_id, np.int32)
        ids_1xT[0, :len(ids)] = ids
        return ids_1xT

    def _reusable(self, prompt_ids: list[int]):
        """(the prefix cache entry to start from, how many of its tokens) or (None, 0): prefill it all."""
        if self.prefix is None:
            return None, 0
        entry, kept = self.prefix.find(prompt_ids)
        kept = min(kept, len(prompt_ids) - 1)  # the last prompt token always runs: its logits start the reply
        n = len(prompt_ids)
        if entry is None or 2 * kept < n:  # copying a whole kept row costs more than a short prefill
            return None, 0
        if prompt_bucket(n - kept) == prompt_bucket(n):  # the prefill's padded length would not shrink
            return None, 0
        return entry, kept

    def release(self, slot: int, ids: list[int] | None = None) -> None:
        """Free the slot; `ids` (the row's prompt + every token it produced) keeps its cache in the prefix cache."""
        if ids and self.prefix is not None:
            length = min(prompt_bucket(len(ids)), self.cfg.block_size)
            kv = row_reader(self.cfg, length)(self.state.cache, np.int32(slot), np.int32(self.start_B[slot]))
            self.prefix.put(ids, kv)
        self.limit_B[slot] = 0
        self.free.append(slot)

    def step(self) -> tuple[list[list[int]], list[bool]]:
        """Up to `chunk` new tokens for every slot, and whether each slot's row produced end-of-text."""
        B = len(self.limit_B)
        taken_B = self.limit_B > 0
        R = B if taken_B[1:].any() else 1  # slot 0 alone (admit fills the lowest free slot) decodes at batch 1
        s = self.settings_Bx5[:R]
        sampling = SamplingParams(s[:, 0:1], s[:, 1:2].astype(np.int32), s[:, 2:3], s[:, 3:4],
                                  s[:, 4:5].astype(np.int32))
        # The window: from the earliest live row's first slot to the chunk's last write, in a power-of-two bucket.
        first = int(self.start_B[taken_B].min(initial=self.cur))
        window = min(prompt_bucket(min(self.cur + self.chunk, 2 * self.cfg.block_size) - first),
                     2 * self.cfg.block_size)
        lo = min(first, 2 * self.cfg.block_size - window)
        self.state, out_RxC = stepper(self.cfg, self.chunk, window, R)(
            self.params, self.state, np.int32(lo), sampling, self.seed_B[:R], self.limit_B[:R], self.eos_id,
            self.n_vocab)
        rows = np.asarray(out_RxC).tolist() + [[]] * (B - R)
        self.cur = int(self.state.cur)
        return [[t for t in row if t >= 0] for row in rows], np.asarray(self.state.done_B).tolist()
