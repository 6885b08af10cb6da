"""Sampling with a KV cache: one prefill, then the whole decode inside one jitted `lax.while_loop`.

Prompts are left-padded to a power-of-two bucket so rows stay aligned in the cache (`start_B` marks the
padding) and a new prompt length within a bucket reuses the compiled function. Temperature, top-k, top-p,
repetition penalty, min_new_tokens, the seeds, the end-of-text id and the stop sequences are traced values:
changing them never recompiles. One compilation per (batch, prompt bucket, max_new_tokens, n-gram size).

Controls applied to the logits before sampling, in HF's order: repetition penalty (CTRL: positive logits
divided by it, negative ones multiplied, for every token already in prompt + output), no-repeat-n-gram
(tokens that would complete an n-gram already in the sequence are banned), min_new_tokens (end-of-text
banned until then); then temperature, top-k, top-p. Each row has its own random key (`seed` may be a list).

The decode state (`DecodeState`) is a pytree, so the same loop body also runs in chunks (streaming: the
cache is carried between jitted calls) and on top of a chat's cache (`jaxgpt.chat`).

Past the context window (`slide=True`, the default): generate until the window is full, then keep the last
half of the text as a new prompt, re-prefill it and go on (nanoGPT's samplers crop the context the same way);
penalties and n-grams then see only that window. While everything fits, sliding changes nothing.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.compile_options import decode_jit
from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.model import GPT, Cache, init_cache
# Re-exported: callers import them here.
from jaxgpt.sampling import SamplingParams, cut_at_eos, left_pad, prompt_bucket, row_keys  # noqa: F401
from jaxgpt.sliding import rounds


_INT_FIELDS = ("top_k", "min_new_tokens")


class DecodeState(NamedTuple):
    """Everything the decode loop carries (B rows, L cache slots, M = longest stop sequence)."""

    i: jax.Array  # new tokens produced so far
    pos: jax.Array  # cache slot of the next token
    cache: Cache
    logits_BxV: jax.Array  # next-token logits (vocabulary padding already -inf)
    seq_BxL: jax.Array  # every token by cache slot (prompt, then output); -1 for padding and empty slots
    seen_BxV: jax.Array  # tokens present in seq_BxL (repetition penalty)
    recent_BxM: jax.Array  # the last M new tokens (-2: none yet), matched against stop sequences
    done_B: jax.Array
    keys_B: jax.Array  # one random key per row


def check_sampling(s: SamplingParams) -> None:
    if s.temperature < 0:
        raise JaxgptError(f"temperature must be >= 0 (0 is greedy), got {s.temperature}")
    if s.top_k < 0:
        raise JaxgptError(f"top_k must be >= 0 (0 keeps every token), got {s.top_k}")
    if not 0 <= s.top_p <= 1:
        raise JaxgptError(f"top_p must be in [0, 1], got {s.top_p}")
    if s.repetition_penalty <= 0:
        raise JaxgptError(f"repetition_penalty must be positive (1.0 is off), got {s.repetition_penalty}")
    if s.min_new_tokens < 0:
        raise JaxgptError(f"min_new_tokens must be >= 0, got {s.min_new_tokens}")


def traced_sampling(s: SamplingParams) -> SamplingParams:
    """Numpy scalars, so jit traces them instead of compiling one program per value."""
    return SamplingParams(*(np.asarray(v, np.int32 if f in _INT_FIELDS else np.float32) for f, v in zip(s._fields, s)))


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


def presence(seq_BxL: jax.Array, V: int) -> jax.Array:
    """BxV: which token ids occur in each row (negative entries are padding)."""
    B = seq_BxL.shape[0]
    ids_BxL = jnp.where(seq_BxL >= 0, seq_BxL, V)  # out of range: dropped by the scatter
    return jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids_BxL].set(True, mode="drop")


def ngram_bans(seq_BxL: jax.Array, pos: jax.Array, n: int, V: int) -> jax.Array:
    """BxV: tokens that would complete an n-gram already in slots < pos (n is static)."""
    B, L = seq_BxL.shape
    if n <= 0 or n > L:
        return jnp.zeros((B, V), bool)
    J = L - n + 1  # n-gram start slots
    # The last n-1 tokens; slots < 0 only happen when no n-gram fits yet, and then nothing matches below.
    last_BxN1 = jax.lax.dynamic_slice(seq_BxL, (0, jnp.maximum(pos - n + 1, 0)), (B, n - 1))
    match_BxJ = seq_BxL[:, n - 1:] >= 0  # the would-be next token is a real token
    for k in range(n - 1):
        gram_k_BxJ = seq_BxL[:, k:k + J]
        match_BxJ &= (gram_k_BxJ >= 0) & (gram_k_BxJ == last_BxN1[:, k:k + 1])
    match_BxJ &= (pos - n + 1 >= 0) & (jnp.arange(J)[None, :] + n - 1 < pos)  # whole n-gram before pos
    next_BxJ = jnp.where(match_BxJ, seq_BxL[:, n - 1:], V)
    return jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], next_BxJ].set(True, mode="drop")


def adjust_logits(logits_BxV, seen_BxV, seq_BxL, pos, i, sampling: SamplingParams, eos_id, ngram: int):
    """Repetition penalty, no-repeat-n-gram and min_new_tokens, applied to raw logits (before temperature)."""
    V = logits_BxV.shape[-1]
    pen = sampling.repetition_penalty
    penalised_BxV = jnp.where(logits_BxV > 0, logits_BxV / pen, logits_BxV * pen)
    logits_BxV = jnp.where(seen_BxV, penalised_BxV, logits_BxV)
    if ngram > 0:
        logits_BxV = jnp.where(ngram_bans(seq_BxL, pos, ngram, V), -jnp.inf, logits_BxV)
    too_early = (i < sampling.min_new_tokens) & (jnp.arange(V) == eos_id)
    return jnp.where(too_early, -jnp.inf, logits_BxV)


def sample_token(logits_BxV: jax.Array, keys_B: jax.Array, sampling: SamplingParams) -> jax.Array:
    """One token per row; row b draws with keys_B[b], so a row's draw does not depend on its batch."""
    # lax.cond skips the vocabulary sort when no filter is on, and all sampling when decoding greedily.
    def draw(logits_BxV):
        scaled_BxV = logits_BxV / jnp.maximum(sampling.temperature, 1e-6)
        filtering = (sampling.top_k > 0) | (sampling.top_p < 1)
        filtered_BxV = jax.lax.cond(filtering, lambda x: filter_logits(x, sampling.top_k, sampling.top_p),
                                    lambda x: x, scaled_BxV)
        return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)

    greedy = lambda logits_BxV: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(sampling.temperature <= 0, greedy, draw, logits_BxV)


def stop_hit(recent_BxM: jax.Array, stop_SxM: jax.Array) -> jax.Array:
    """B: the newest tokens end with one of the stop sequences (right-aligned in stop_SxM, -1 padded)."""
    same_BxSxM = (stop_SxM[None] == -1) | (recent_BxM[:, None, :] == stop_SxM[None])
    return jnp.any(jnp.all(same_BxSxM, axis=-1) & jnp.any(stop_SxM != -1, axis=-1)[None], axis=-1)


def forward_cached(cfg: ModelConfig, params, tokens_BxT, cache, index, start_B, n_vocab):
    """Logits BxTxV (vocabulary padding -inf) and the cache with this chunk written at `index`."""
    logits_BxTxV, cache = GPT(cfg).apply({"params": params}, tokens_BxT, cache=cache, cache_index=index,
                                         start_B=start_B)
    return jnp.where(jnp.arange(cfg.vocab_size) < n_vocab, logits_BxTxV, -jnp.inf), cache


def prefill(cfg: ModelConfig, params, prompt_BxP, start_B, keys_B, n_vocab, stop_SxM, length: int) -> DecodeState:
    """Run the left-padded prompts through a fresh cache of `length` slots."""
    B, P = prompt_BxP.shape
    logits_BxPxV, cache = forward_cached(cfg, params, prompt_BxP, init_cache(cfg, B, length), 0, start_B, n_vocab)
    real_BxP = jnp.arange(P)[None, :] >= start_B[:, None]
    seq_BxL = jnp.full((B, length), -1, jnp.int32).at[:, :P].set(jnp.where(real_BxP, prompt_BxP, -1))
    M = stop_SxM.shape[1]
    return DecodeState(jnp.int32(0), jnp.int32(P), cache, logits_BxPxV[:, -1], seq_BxL,
                       presence(seq_BxL, cfg.vocab_size), jnp.full((B, M), -2, jnp.int32), jnp.zeros((B,), bool),
                       keys_B)


def running(st: DecodeState, limit) -> jax.Array:
    """Whether the decode goes on: fewer than `limit` new tokens, a row not done, and room in the cache."""
    return (st.i < limit) & ~jnp.all(st.done_B) & (st.pos < st.seq_BxL.shape[1])


def sample_step(cfg: ModelConfig, st: DecodeState, sampling, eos_id, stop_SxM,
                ngram: int) -> tuple[DecodeState, jax.Array]:
    """Pick every row's next token from st.logits_BxV and record it (done rows repeat end-of-text): (state,
    token_B). The cache and logits are left as they are."""
    rows_B = jnp.arange(st.seq_BxL.shape[0])
    logits_BxV = adjust_logits(st.logits_BxV, st.seen_BxV, st.seq_BxL, st.pos, st.i, sampling, eos_id, ngram)
    step_keys_B = jax.vmap(lambda k: jax.random.fold_in(k, st.i))(st.keys_B)
    token_B = jnp.where(st.done_B, eos_id, sample_token(logits_BxV, step_keys_B, sampling))
    seq_BxL = jax.lax.dynamic_update_slice(st.seq_BxL, token_B[:, None], (0, st.pos))
    seen_BxV = st.seen_BxV.at[rows_B, jnp.where(token_B >= 0, token_B, cfg.vocab_size)].set(True, mode="drop")
    recent_BxM = jnp.concatenate([st.recent_BxM[:, 1:], token_B[:, None]], axis=1)
    done_B = st.done_B | (token_B == eos_id) | stop_hit(recent_BxM, stop_SxM)
    return st._replace(i=st.i + 1, pos=st.pos + 1, seq_BxL=seq_BxL, seen_BxV=seen_BxV, recent_BxM=recent_BxM,
                       done_B=done_B), token_B


def decode_loop(cfg: ModelConfig, params, state: DecodeState, start_B, limit, sampling, eos_id, n_vocab, stop_SxM,
                ngram: int, window: int | None = None) -> DecodeState:
    """Sample until `limit` new tokens in all, every row is done, or the cache is full. Every token is also run
    through the model, so the returned state's cache and logits continue the text (streaming, chat turns).

    With `window` the loop stops at cache slot `window` too and carries only the cache's first `window` slots,
    so each step attends over (reads) those instead of the whole cache."""

    def body(st: DecodeState):
        new, token_B = sample_step(cfg, st, sampling, eos_id, stop_SxM, ngram)
        logits_Bx1xV, cache = forward_cached(cfg, params, token_B[:, None], st.cache, st.pos, start_B, n_vocab)
        return new._replace(cache=cache, logits_BxV=logits_Bx1xV[:, 0])

    S = state.seq_BxL.shape[1]
    if window is None or window >= S:
        return jax.lax.while_loop(lambda st: running(st, limit), body, state)
    cut = state._replace(cache=jax.tree.map(lambda a_BxSxHxK: a_BxSxHxK[:, :window], state.cache))
    cut = jax.lax.while_loop(lambda st: running(st, limit) & (st.pos < window), body, cut)
    cache = jax.tree.map(lambda full, part: jax.lax.dynamic_update_slice(full, part, (0, 0, 0, 0)), state.cache,
                         cut.cache)
    return cut._replace(cache=cache)


def decode_windows(P: int, length: int) -> list[int]:
    """The cache windows one-shot decoding grows through: powers of two above the prompt, then the whole cache.
    Decoding at batch 8 reads about as many bytes of KV cache as of weights per step, so attending only over
    the slots written so far saves up to half of that read."""
    windows, w = [], 64
    while w <= P:
        w *= 2
    while w < length:
        windows.append(w)
        w *= 2
    return windows + [length]


def decode(cfg: ModelConfig, params, prompt_BxP, start_B, keys_B, limit, sampling, eos_id, n_vocab, stop_SxM,
           max_new_tokens: int, ngram: int) -> tuple[jax.Array, jax.Array]:
    """Prefill + decode of up to `limit` (<= max_new_tokens) new tokens: (new tokens BxN, done B), N =
    max_new_tokens. The last token is only sampled: no forward pass computes logits nobody reads."""
    P = prompt_BxP.shape[1]
    state = prefill(cfg, params, prompt_BxP, start_B, keys_B, n_vocab, stop_SxM, P + max_new_tokens)
    for window in decode_windows(P, P + max_new_tokens):
        state = decode_loop(cfg, params, state, start_B, limit - 1, sampling, eos_id, n_vocab, stop_SxM, ngram, window)
    last = state._replace(cache=None)  # the final step needs no cache: keep it out of the cond
    last = jax.lax.cond(running(last, limit), lambda st: sample_step(cfg, st, sampling, eos_id, stop_SxM, ngram)[0],
                        lambda st: st, last)
    return last.seq_BxL[:, P:], last.done_B


@functools.lru_cache(maxsize=64)
def _decoder(cfg: ModelConfig, max_new_tokens: int, ngram: int = 0):
    """Jitted `decode` of max_new_tokens: (new tokens BxN, done B)."""

    def run(params, prompt_BxP, start_B, keys_B, sampling, eos_id, n_vocab, stop_SxM):
        return decode(cfg, params, prompt_BxP, start_B, keys_B, max_new_tokens, sampling, eos_id, n_vocab, stop_SxM,
                      max_new_tokens, ngram)

    return decode_jit(run)


def _get_decoder(cfg: ModelConfig, max_new_tokens: int, ngram: int):
    # Same call shape as `_decoder(cfg, n)` when n-grams are off, so lru_cache hands back the same function.
    return _decoder(cfg, max_new_tokens) if ngram == 0 else _decoder(cfg, max_new_tokens, ngram)


@functools.lru_cache(maxsize=64)
def _prefiller(cfg: ModelConfig, length: int):
    return decode_jit(lambda params, prompt_BxP, start_B, keys_B, n_vocab, stop_SxM: prefill(
        cfg, params, prompt_BxP, start_B, keys_B, n_vocab, stop_SxM, length))


@functools.lru_cache(maxsize=64)
def continuer(cfg: ModelConfig, ngram: int = 0):
    """Jitted `decode_loop` from a given state (streaming chunks, chat turns); `limit` is traced."""
    return decode_jit(functools.partial(decode_loop, cfg, ngram=ngram))


def stop_array(stop_ids: Sequence[Sequence[int]] | None) -> np.ndarray:
    """Stop token sequences right-aligned in an SxM array (-1 padded), bucketed so shapes rarely change."""
    seqs = [list(s) for s in (stop_ids or []) if len(s)]
    S = prompt_bucket(len(seqs), 4)
    M = prompt_bucket(max((len(s) for s in seqs), default=1), 8)
    stop_SxM = np.full((S, M), -1, np.int32)
    for j, s in enumerate(seqs):
        stop_SxM[j, M - len(s):] = s
    return stop_SxM


class _Request(NamedTuple):
    tokens_BxP: np.ndarray
    start_B: np.ndarray
    keys_B: jax.Array
    sampling: SamplingParams
    stop_SxM: np.ndarray
    eos_id: np.ndarray
    n_vocab: np.ndarray


def _prepare(cfg, prompts, max_new_tokens, eos_id, n_vocab, sampling, seed, stop_ids, ngram, keys_B=None) -> _Request:
    if max_new_tokens <= 0:
        raise JaxgptError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if ngram < 0:
        raise JaxgptError(f"no_repeat_ngram_size must be >= 0 (0 is off), got {ngram}")
    if not prompts:
        raise JaxgptError("no prompts given")
    check_sampling(sampling)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.block_size:
        raise JaxgptError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context of {cfg.block_size} tokens; lower max_new_tokens (--max-new-tokens), shorten "
                          "the prompt, or let the window slide (slide=True, the default; drop --no-slide)")
    bucket = min(prompt_bucket(longest), cfg.block_size - max_new_tokens)
    tokens_BxP, start_B = left_pad(prompts, eos_id, bucket)
    keys_B = row_keys(seed, len(prompts)) if keys_B is None else keys_B
    return _Request(tokens_BxP, start_B, keys_B, traced_sampling(sampling), stop_array(stop_ids), np.int32(eos_id),
                    np.int32(n_vocab or cfg.vocab_size))


def generate_ids(params, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int,
                 n_vocab: int | None = None, sampling: SamplingParams = SamplingParams(),
                 seed: int | Sequence[int] = 0, stop_ids: Sequence[Sequence[int]] | None = None,
                 no_repeat_ngram_size: int = 0, slide: bool = True) -> list[list[int]]:
    """New token ids for each prompt, cut at the first end-of-text (a matched stop sequence is kept)."""
    prompts = [list(p) if len(p) else [eos_id] for p in prompts]  # an empty prompt starts from end-of-text
    if not (slide and prompts and needs_slide(cfg, prompts, max_new_tokens)):
        return _generate(params, cfg, prompts, max_new_tokens, eos_id, n_vocab, sampling, seed, stop_ids,
                         no_repeat_ngram_size)[0]
    outputs: list[list[int]] = [[] for _ in prompts]
    for plan in _slide(cfg, prompts, outputs, max_new_tokens, sampling, seed):
        new, done = _generate(params, cfg, plan.contexts, plan.n, eos_id, n_vocab, plan.sampling, 0, stop_ids,
                              no_repeat_ngram_size, keys_B=plan.keys_B)
        plan.record(new, done)
    return outputs


def _generate(params, cfg, prompts, max_new_tokens, eos_id, n_vocab, sampling, seed, stop_ids, ngram, keys_B=None):
    r = _prepare(cfg, prompts, max_new_tokens, eos_id, n_vocab, sampling, seed, stop_ids, ngram, keys_B)
    out_BxN, done_B = _get_decoder(cfg, max_new_tokens, ngram)(params, r.tokens_BxP, r.start_B, r.keys_B, r.sampling,
                                                               r.eos_id, r.n_vocab, r.stop_SxM)
    return [cut_at_eos(row, eos_id) for row in np.asarray(out_BxN).tolist()], np.asarray(done_B).tolist()


def needs_slide(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> bool:
    """Whether the longest prompt + max_new_tokens overflows the context window."""
    return max(len(p) for p in prompts) + max_new_tokens > cfg.block_size


def _slide(cfg: ModelConfig, prompts, outputs, max_new_tokens, sampling, seed):
    """Past block_size: fill the window, keep its last half as the next prompt (re-prefilled), repeat."""
    return rounds(prompts, outputs, max_new_tokens, sampling, seed, block_size=cfg.block_size,
                  window=cfg.block_size - 1)


def stream_ids(params, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int,
               n_vocab: int | None = None, sampling: SamplingParams = SamplingParams(),
               seed: int | Sequence[int] = 0, stop_ids: Sequence[Sequence[int]] | None = None,
               no_repeat_ngram_size: int = 0, chunk: int = 8, slide: bool = True) -> Iterator[list[list[int]]]:
    """Yield each row's new tokens every `chunk` steps; the cache stays on device between jitted chunks.

    The tokens, concatenated, equal `generate_ids` with the same arguments (one compile for every chunk).
    """
    if chunk <= 0:
        raise JaxgptError(f"chunk must be positive, got {chunk}")
    prompts = [list(p) if len(p) else [eos_id] for p in prompts]
    if not (slide and prompts and needs_slide(cfg, prompts, max_new_tokens)):
        yield from _stream(params, cfg, prompts, max_new_tokens, eos_id, n_vocab, sampling, seed, stop_ids,
                           no_repeat_ngram_size, chunk)
        return
    outputs: list[list[int]] = [[] for _ in prompts]
    for plan in _slide(cfg, prompts, outputs, max_new_tokens, sampling, seed):
        new: list[list[int]] = [[] for _ in plan.rows]
        ended: list[bool] = []
        for pieces in _stream(params, cfg, plan.contexts, plan.n, eos_id, n_vocab, plan.sampling, 0, stop_ids,
                              no_repeat_ngram_size, chunk, keys_B=plan.keys_B, ended_out=ended):
            out = [[] for _ in prompts]
            for j, (b, toks) in enumerate(zip(plan.rows, pieces)):
                new[j] += toks
                out[b] = toks
            yield out
        plan.record(new, ended)


def _stream(params, cfg, prompts, max_new_tokens, eos_id, n_vocab, sampling, seed, stop_ids, no_repeat_ngram_size,
            chunk, keys_B=None, ended_out: list[bool] | None = None) -> Iterator[list[list[int]]]:
    """One window's streaming decode; `ended_out` receives each row's ended flag when it finishes."""
    r = _prepare(cfg, prompts, max_new_tokens, eos_id, n_vocab, sampling, seed, stop_ids, no_repeat_ngram_size,
                 keys_B)
    P = r.tokens_BxP.shape[1]
    state = _prefiller(cfg, P + max_new_tokens)(params, r.tokens_BxP, r.start_B, r.keys_B, r.n_vocab, r.stop_SxM)
    step = continuer(cfg, no_repeat_ngram_size)
    ended = [False] * len(prompts)
    emitted = 0
    while emitted < max_new_tokens and not all(ended):
        state = step(params, state, r.start_B, np.int32(min(emitted + chunk, max_new_tokens)), r.sampling, r.eos_id,
                     r.n_vocab, r.stop_SxM)
        produced = int(state.i)
        rows = np.asarray(state.seq_BxL[:, P + emitted:P + produced]).tolist()
        out = []
        for b, row in enumerate(rows):
            new = [] if ended[b] else cut_at_eos(row, eos_id)
            ended[b] = ended[b] or len(new) < len(row)
            out.append(new)
        ended = [e or d for e, d in zip(ended, np.asarray(state.done_B).tolist())]
        emitted = produced
        if ended_out is not None:
            ended_out[:] = ended
        yield out
