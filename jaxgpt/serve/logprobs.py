"""OpenAI `logprobs` objects from jaxgpt.score_rows results, in the completions and the chat shapes.

Completions (legacy): `{tokens, token_logprobs, top_logprobs, text_offset}`, one entry per token. With
`echo` the prompt's tokens come first and the very first token has `null` (it has no context). Each
`top_logprobs` entry maps token text -> log-prob for the N most likely tokens plus the chosen one (as
vLLM does, so a caller can tell whether the chosen token was the argmax). `text_offset` is the character
offset of each token in the returned `text`.

Chat: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}]}` for the
generated tokens, with exactly N alternatives, best first.

A token that is only part of a UTF-8 character is written `bytes:\\xNN...` as OpenAI does.

Streams (`StreamedChoice`) carry the same objects per chunk, for that chunk's tokens (completions'
`text_offset` still counts from the start of the choice's text), so the chunks' logprobs concatenate to
the non-streamed response's. A chunk waits for the scoring pass that covers its tokens.
"""

from __future__ import annotations

import math
from typing import Any

from jaxgpt.score_rows import TokenLogprobs


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's own bytes (exact for GPT-2's byte-level BPE; the decoded text for other tokenizers)."""
    enc = getattr(tokenizer, "enc", None)  # tiktoken knows every token's bytes, even half a character
    if enc is not None and token_id != tokenizer.eos_id:
        return enc.decode_single_token_bytes(token_id)
    return tokenizer.decode([token_id]).encode("utf-8")


def token_text(tokenizer, token_id: int) -> str:
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _logprob(value) -> float:
    return -9999.0 if math.isinf(value) else float(value)  # JSON has no -Infinity; OpenAI's floor is -9999


def completion_logprobs(tokenizer, ids: list[int], result: TokenLogprobs, first: int, top_n: int,
                        origin: int | None = None) -> dict[str, Any]:
    """Tokens `first`.. of `ids` (the prompt + completion that `result` scored, or a prefix of it); offsets
    count from token `origin` (default `first`)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    base = len(tokenizer.decode(ids[:first if origin is None else origin]))
    for t in range(first, len(ids)):
        tokens.append(token_text(tokenizer, ids[t]))
        text_offset.append(len(tokenizer.decode(ids[:t])) - base)
        if t == 0:  # the first token of the text has no context
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_logprob(result.logprob_T[t]))
        top = {token_text(tokenizer, int(i)): _logprob(lp)
               for i, lp in zip(result.top_ids_TxK[t, :top_n], result.top_logprob_TxK[t, :top_n])}
        top.setdefault(tokens[-1], token_logprobs[-1])
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(tokenizer, ids: list[int], result: TokenLogprobs, first: int, top_n: int) -> dict[str, Any]:
    """The generated tokens `first`.. of `ids` in the chat shape."""

    def entry(token_id: int, logprob) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token_id), "logprob": _logprob(logprob),
                "bytes": list(token_bytes(tokenizer, token_id))}

    content = []
    for t in range(first, len(ids)):
        alternatives = [entry(int(i), lp) for i, lp in zip(result.top_ids_TxK[t, :top_n],
                                                           result.top_logprob_TxK[t, :top_n])]
        content.append({**entry(ids[t], result.logprob_T[t]), "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def shown_ids(tokenizer, ids: list[int], text: str) -> list[int]:
    """The generated tokens behind `text` (what a choice shows of `ids`): those past a stop string are dropped."""
    if tokenizer.decode(ids) == text:
        return list(ids)
    return next(ids[:k] for k in range(len(ids) + 1) if len(tokenizer.decode(ids[:k])) >= len(text))


class StreamedChoice:
    """One streamed choice with logprobs: each text piece is held until a scoring pass covers its tokens.

    `add` and `scored` return (pieces ready to send as (text, logprobs, finish_reason), a row of ids to
    score next or None); at most one scoring pass per choice is in flight, and it covers every held piece.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], chat: bool, top_n: int):
        self.tokenizer, self.prompt, self.chat, self.top_n = tokenizer, list(prompt_ids), chat, top_n
        self.text, self.ids = "", []  # every piece so far, and the generated ids behind it
        self.held: list[tuple[str, int, str | None]] = []  # (piece, ids it ends at, finish_reason)
        self.sent = 0  # ids whose logprobs went out
        self.result: TokenLogprobs | None = None  # the latest scoring pass and how many ids it covers
        self.covered = 0
        self.scoring = False

    def add(self, piece: str, ids: list[int], finish_reason: str | None = None):
        """A text piece (or the finish, with the final ids) and the ids generated so far."""
        self.text += piece
        self.ids = shown_ids(self.tokenizer, ids, self.text)
        self.held.append((piece, len(self.ids), finish_reason))
        return self._release(), self._due()

    def scored(self, result: TokenLogprobs):
        self.scoring, self.result = False, result
        self.covered = len(result.logprob_T) - len(self.prompt)
        return self._release(), self._due()

    def _release(self) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        ready = []
        while self.held and self.held[0][1] <= self.covered:
            piece, end, reason = self.held.pop(0)
            ready.append((piece, None if reason and end == self.sent else self._logprobs(end), reason))
            self.sent = max(self.sent, end)
        return ready

    def _logprobs(self, end: int) -> dict[str, Any]:
        row, first = self.prompt + self.ids[:end], len(self.prompt) + self.sent
        if self.chat:
            return chat_logprobs(self.tokenizer, row, self.result, first, self.top_n)
        return completion_logprobs(self.tokenizer, row, self.result, first, self.top_n, origin=len(self.prompt))

    def _due(self) -> list[int] | None:
        if self.scoring or not self.held:
            return None
        self.scoring = True
        return self.prompt + self.ids[:self.held[-1][1]]
