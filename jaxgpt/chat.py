"""Multi-turn chat over one KV cache: each turn prefills only its own tokens on top of the conversation.

The conversation is rendered in the run's `jaxgpt.conversation` template (the one SFT trained on): every
message is tokenized as one string and closed by end-of-text, so a new turn always starts at a token
boundary. After a reply, the cache holds the ids the model generated; the conversation's own ids come
from re-tokenizing the reply's text. Before a turn the session compares the two and prefills from the
first position where they differ (normally the new user message: a reply the model wrote in canonical
ids, closed by end-of-text, costs nothing; a reply cut by max_new_tokens only adds its end-of-text).
So the cache always holds exactly the ids of tokenizing the whole conversation at once.

Context policy: before a turn, the conversation + the new user message + the reply header +
max_new_tokens must fit in block_size. If it does not, the oldest (user, assistant) turns are dropped,
the system prompt is kept, and the conversation is prefilled again from the first changed position. A
single user message that does not fit even alone with the system prompt is an error.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxgpt import conversation
from jaxgpt.compile_options import decode_jit
from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import (DecodeState, check_sampling, continuer, forward_cached, presence, stop_array,
                             traced_sampling)
from jaxgpt.model import init_cache
from jaxgpt.sampling import SamplingParams, prompt_bucket, row_keys


def default_reply_tokens(block_size: int) -> int:
    """Reply length when none is asked for: 128 tokens, or half the context on smaller models."""
    return min(128, block_size // 2)


@functools.lru_cache(maxsize=16)
def _chunk_prefiller(cfg: ModelConfig):
    """Write a right-padded chunk of tokens into the cache at `pos`; next-token logits after its last real token."""

    def run(params, cache, chunk_1xT, pos, n_real, n_vocab):
        logits_1xTxV, cache = forward_cached(cfg, params, chunk_1xT, cache, pos, None, n_vocab)
        # Padding after the real tokens lands in slots the reply overwrites before anything attends to them.
        return jax.lax.dynamic_index_in_dim(logits_1xTxV, n_real - 1, axis=1, keepdims=False), cache

    return decode_jit(run)


class ChatSession:
    """A conversation with a model; `send` returns the reply text. See the module docstring for the policy."""

    def __init__(self, params, cfg: ModelConfig, tokenizer, system: str | None = None, reuse_cache: bool = True,
                 template: conversation.Template = conversation.DEFAULT):
        self.params, self.cfg, self.tokenizer, self.template = params, cfg, tokenizer, template
        self.eos_id = tokenizer.eos_id
        self.system_ids = conversation.message_ids(template, "system", system, tokenizer)[0] if system else []
        self.reply_header_ids = conversation.header_ids(template, "assistant", tokenizer)
        self.turns: list[tuple[list[int], list[int]]] = []  # (user message ids, assistant message ids), canonical
        self.history: list[tuple[str, str]] = []  # (user text, reply text)
        self.reuse_cache = reuse_cache  # False re-prefills the whole conversation every turn (a baseline)
        self.cached: list[int] = []  # the token ids whose keys/values are in the cache, slot by slot
        self.cache = None
        self.n_dropped = 0  # turns dropped so far to stay inside block_size
        self.last_prefill = 0  # tokens the last turn ran through the prefill
        if len(self.system_ids) >= cfg.block_size:
            raise JaxgptError(f"system prompt ({len(self.system_ids)} tokens) does not fit the model's context "
                              f"of {cfg.block_size} tokens; shorten it (--system / system=)")

    @property
    def tokens(self) -> list[int]:
        """The whole conversation's ids: equal to `conversation.conversation_ids` of its messages."""
        return self.system_ids + [t for user, reply in self.turns for t in user + reply]

    def send(self, user_text: str, max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             min_new_tokens: int = 0, seed: int = 0) -> str:
        """Add a user turn, generate the assistant's reply (ended by end-of-text) and return its text.

        `max_new_tokens` defaults to `default_reply_tokens(block_size)`: a reply never needs the whole context.
        """
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, min_new_tokens)
        check_sampling(sampling)
        user_ids = conversation.message_ids(self.template, "user", user_text, self.tokenizer)[0]
        new_ids = user_ids + self.reply_header_ids
        S = self.cfg.block_size
        if max_new_tokens is None:  # the default also shrinks to the room this message leaves
            max_new_tokens = max(1, min(default_reply_tokens(S), S - len(self.system_ids) - len(new_ids)))
        if max_new_tokens <= 0:
            raise JaxgptError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if len(self.system_ids) + len(new_ids) + max_new_tokens > S:
            raise JaxgptError(f"this message ({len(user_ids)} tokens) + max_new_tokens ({max_new_tokens}) does not "
                              f"fit the model's context of {S} tokens with the system prompt; lower max_new_tokens "
                              "(--max-new-tokens) or shorten the message or the system prompt")
        while len(self.tokens) + len(new_ids) + max_new_tokens > S:  # policy: drop the oldest turn
            self.turns.pop(0)
            self.history.pop(0)
            self.n_dropped += 1
        prompt = self.tokens + new_ids
        if not self.reuse_cache or self.cache is None:
            self.cache, self.cached = init_cache(self.cfg, 1, S), []
        # Keep the cached prefix that equals the conversation's ids; prefill from the first difference.
        keep = next((i for i, (a, b) in enumerate(zip(self.cached, prompt)) if a != b), len(self.cached))
        keep = min(keep, len(prompt) - 1)  # the last prompt token is always run: its logits start the reply
        self.cached = self.cached[:keep]
        self.last_prefill = len(prompt) - keep
        logits_1xV = self._prefill(prompt[keep:])
        generated = self._decode(logits_1xV, max_new_tokens, sampling, no_repeat_ngram_size, seed)
        reply = conversation.reply_text(self.template, generated, self.tokenizer)
        reply_message = conversation.message_ids(self.template, "assistant", reply, self.tokenizer)[0]
        self.turns.append((user_ids, reply_message))
        self.history.append((user_text, reply))
        return reply

    def _prefill(self, new_ids: list[int]):
        n_vocab = np.int32(self.tokenizer.vocab_size)
        run = _chunk_prefiller(self.cfg)
        logits_1xV = None
        while new_ids:
            pos = len(self.cached)
            # Bucketed chunk, never past the cache end: a new turn length within a bucket does not recompile.
            T = min(prompt_bucket(len(new_ids)), self.cfg.block_size - pos)
            piece = new_ids[:T]
            chunk_1xT = np.zeros((1, T), np.int32)
            chunk_1xT[0, :len(piece)] = piece
            logits_1xV, self.cache = run(self.params, self.cache, chunk_1xT, np.int32(pos), np.int32(len(piece)),
                                         n_vocab)
            self.cached += piece
            new_ids = new_ids[T:]
        return logits_1xV

    def _decode(self, logits_1xV, max_new_tokens, sampling, ngram, seed) -> list[int]:
        S, pos = self.cfg.block_size, len(self.cached)
        seq_1xL = np.full((1, S), -1, np.int32)
        seq_1xL[0, :pos] = self.cached
        stop_SxM = stop_array(None)
        state = DecodeState(np.int32(0), np.int32(pos), self.cache, logits_1xV, seq_1xL,
                            presence(seq_1xL, self.cfg.vocab_size), np.full((1, stop_SxM.shape[1]), -2, np.int32),
                            np.zeros((1,), bool), row_keys(seed, 1))
        state = continuer(self.cfg, ngram)(self.params, state, np.zeros((1,), np.int32), np.int32(max_new_tokens),
                                           traced_sampling(sampling), np.int32(self.eos_id),
                                           np.int32(self.tokenizer.vocab_size), stop_SxM)
        n = int(state.i)
        reply_ids = np.asarray(state.seq_BxL[0, pos:pos + n]).tolist()
        self.cache = state.cache  # now holds the reply's keys/values too (end-of-text included)
        self.cached += reply_ids
        return reply_ids

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.turns, self.history, self.cached, self.cache = [], [], [], None
