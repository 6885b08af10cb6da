"""OpenAI `logprobs` objects from jaxgpt.score_rows results, in the completions and the chat shapes.

Completions (legacy): `{tokens, token_logprobs, top_logprobs, text_offset}`, one entry per token. With
`echo` the prompt's tokens come first and the very first token has `null` (it has no context). Each
`top_logprobs` entry maps token text -> log-prob for the N most likely tokens plus the chosen one (as
vLLM does, so a caller can tell whether the chosen token was the argmax). `text_offset` is the character
offset of each token in the returned `text`.

Chat: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}]}` for the
generated tokens, with exactly N alternatives, best first.

A token that is only part of a UTF-8 character is written `bytes:\\xNN...` as OpenAI does.
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


def completion_logprobs(tokenizer, ids: list[int], result: TokenLogprobs, first: int, top_n: int) -> dict[str, Any]:
    """Tokens `first`.. of `ids` (the prompt + completion that `result` scored); offsets count from `first`."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    base = len(tokenizer.decode(ids[:first]))
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
