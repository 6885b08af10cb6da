"""OpenAI request validation and response bodies for /v1/completions and /v1/chat/completions.

Requests are checked by hand against a small field table, so every error names its field and comes back
in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Unknown fields are rejected (a typo
silently ignored is worse than a 400). Extensions beyond OpenAI's fields, as vLLM spells them: `top_k`,
`repetition_penalty`. A completions `prompt` is a string, a list of strings, a list of token ids or a
list of such lists; `echo` with `max_tokens: 0` and `logprobs` scores a text without generating.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from jaxgpt import conversation
from jaxgpt.sampling import MAX_TOP


class ApiError(Exception):
    """An error returned to the client as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    max_choices: int = 32  # prompts x n per request


@dataclass
class Request:
    """A validated request: what the batcher needs, independent of the endpoint."""

    chat: bool
    prompts: list[Any]  # completions: strings or lists of token ids; chat: one list of messages
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    n: int
    stream: bool
    include_usage: bool
    stop: list[str]
    seed: int | None
    model: str | None
    echo: bool = False  # completions: the prompt is returned (and scored) before the completion
    logprobs: int | None = None  # alternatives per position; None: no logprobs at all


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _or(value, default):
    return default if value is None else value


def _expect(ok: bool, name: str, what: str, value) -> None:
    if not ok:
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}"[:300], param=name)


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "n", "stream",
           "stream_options", "stop", "seed", "user", "presence_penalty", "frequency_penalty", "logprobs"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
ROLES = ("system", "user", "assistant")


def parse(body: Any, chat: bool, limits: Limits) -> Request:
    """Validate a decoded JSON body; raises ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    allowed = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    g = body.get
    model = g("model")
    _expect(model is None or isinstance(model, str), "model", "a string", model)
    if chat:
        prompts = [_messages(g("messages"))]
    else:
        prompts = _prompts(g("prompt", None))
    max_key = "max_completion_tokens" if chat and g("max_completion_tokens") is not None else "max_tokens"
    max_tokens = g(max_key)
    echo = False if chat or g("echo") is None else g("echo")
    _expect(isinstance(echo, bool), "echo", "a boolean", echo)
    if max_tokens is not None:
        if echo:  # echo with max_tokens 0 scores the prompt without generating
            _expect(_is_int(max_tokens) and max_tokens >= 0, max_key, "an integer >= 0", max_tokens)
        else:
            _expect(_is_int(max_tokens) and max_tokens >= 1, max_key, "a positive integer (0 only with echo)",
                    max_tokens)
        if max_tokens > limits.max_new_tokens:
            raise ApiError(400, f"'{max_key}' is {max_tokens}; this server generates at most "
                                f"{limits.max_new_tokens} tokens per request", param=max_key)
    # null means the default, as in OpenAI's API.
    temperature, top_p, top_k, rep = (_or(g(k), d) for k, d in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0),
                                                               ("repetition_penalty", 1.0)))
    _expect(_is_num(temperature) and 0 <= temperature <= 2, "temperature", "a number in [0, 2]", temperature)
    _expect(_is_num(top_p) and 0 < top_p <= 1, "top_p", "a number in (0, 1]", top_p)
    _expect(_is_int(top_k) and top_k >= 0, "top_k", "an integer >= 0 (0 is off)", top_k)
    _expect(_is_num(rep) and 0 < rep <= 10, "repetition_penalty", "a number in (0, 10]", rep)
    for name in ("presence_penalty", "frequency_penalty"):  # accepted only at their no-op value
        _expect(g(name) in (None, 0, 0.0), name, "0 (not supported by this server)", g(name))
    _expect(g("suffix") is None, "suffix", "null (not supported by this server)", g("suffix"))
    logprobs = _chat_logprobs(g) if chat else _completion_logprobs(g)
    _expect(g("best_of") in (None, 1), "best_of", "1 (not supported by this server)", g("best_of"))
    n = 1 if g("n") is None else g("n")
    _expect(_is_int(n) and 1 <= n <= limits.max_n, "n", f"an integer in [1, {limits.max_n}]", n)
    if len(prompts) * n > limits.max_choices:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} is more than {limits.max_choices} choices", param="n")
    stream = False if g("stream") is None else g("stream")
    _expect(isinstance(stream, bool), "stream", "a boolean", stream)
    opts = g("stream_options")
    _expect(opts is None or (isinstance(opts, dict) and set(opts) <= {"include_usage"}
                             and isinstance(opts.get("include_usage", False), bool)),
            "stream_options", 'null or {"include_usage": bool}', opts)
    _expect(opts is None or stream, "stream_options", "set only with stream=true", opts)
    _expect(not (stream and echo), "echo", "unset when stream is true (not supported by this server)", echo)
    stop = g("stop")
    stop = [stop] if isinstance(stop, str) else stop
    _expect(stop is None or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)),
            "stop", "a non-empty string or a list of up to 4 of them", g("stop"))
    seed = g("seed")
    _expect(seed is None or (_is_int(seed) and 0 <= seed < 2**31), "seed", "an integer in [0, 2**31)", seed)
    _expect(g("user") is None or isinstance(g("user"), str), "user", "a string", g("user"))
    return Request(chat, prompts, max_tokens, float(temperature), float(top_p), int(top_k), float(rep), n, stream,
                   bool((opts or {}).get("include_usage", False)), stop or [], seed, model, echo, logprobs)


def parse_tokenize(body: Any) -> str:
    """vLLM's POST /tokenize body: {"prompt": text, "add_special_tokens": bool, "model": name}."""
    _expect(isinstance(body, dict) and set(body) <= {"prompt", "add_special_tokens", "model"}, "body",
            'an object with "prompt" (and optional "add_special_tokens", "model")', body)
    _expect(isinstance(body.get("prompt"), str), "prompt", "a string", body.get("prompt"))
    return body["prompt"]


def parse_detokenize(body: Any, n_vocab: int) -> list[int]:
    """vLLM's POST /detokenize body: {"tokens": [ids], "model": name}."""
    _expect(isinstance(body, dict) and set(body) <= {"tokens", "model"}, "body",
            'an object with "tokens" (and optional "model")', body)
    tokens = body.get("tokens")
    _expect(isinstance(tokens, list) and all(_is_int(t) and 0 <= t < n_vocab for t in tokens), "tokens",
            f"a list of token ids in [0, {n_vocab})", tokens)
    return tokens


def _completion_logprobs(g) -> int | None:
    n = g("logprobs")
    _expect(n is None or (_is_int(n) and 0 <= n <= MAX_TOP), "logprobs", f"null or an integer in [0, {MAX_TOP}]", n)
    return n


def _chat_logprobs(g) -> int | None:
    on, top = g("logprobs"), g("top_logprobs")
    _expect(on is None or isinstance(on, bool), "logprobs", "a boolean", on)
    _expect(top is None or (_is_int(top) and 0 <= top <= MAX_TOP), "top_logprobs",
            f"null or an integer in [0, {MAX_TOP}]", top)
    _expect(top is None or on, "top_logprobs", "set only with logprobs=true", top)
    return (top or 0) if on else None


def _is_ids(p) -> bool:
    return isinstance(p, list) and len(p) > 0 and all(_is_int(t) and t >= 0 for t in p)


def _prompts(prompt) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    what = "a string, a non-empty list of strings, a list of token ids (integers >= 0) or a list of such lists"
    if isinstance(prompt, str):
        return [prompt]
    _expect(isinstance(prompt, list) and len(prompt) > 0, "prompt", what, prompt)
    if all(_is_int(t) for t in prompt):
        _expect(_is_ids(prompt), "prompt", what, prompt)
        return [prompt]
    _expect(all(isinstance(p, str) for p in prompt) or all(_is_ids(p) for p in prompt), "prompt", what, prompt)
    return prompt


def _messages(messages) -> list[tuple[str, str]]:
    _expect(isinstance(messages, list) and len(messages) > 0, "messages", "a non-empty list of messages", messages)
    out = []
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        _expect(isinstance(m, dict) and set(m) <= {"role", "content", "name"}, name,
                "an object with 'role' and 'content' (and optional 'name')", m)
        role, content = m.get("role"), m.get("content")
        _expect(role in ROLES, f"{name}.role", f"one of {', '.join(ROLES)}", role)
        if isinstance(content, list):  # content parts: only text is supported
            _expect(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                        for p in content), f"{name}.content", "a string or a list of text parts", content)
            content = "".join(p["text"] for p in content)
        _expect(isinstance(content, str), f"{name}.content", "a string", content)
        out.append((role, content))
    if out[-1][0] != "user":
        raise ApiError(400, "the last message must have role 'user' (the reply continues the conversation)",
                       param=f"messages[{len(out) - 1}].role")
    return out


def chat_ids(messages: list[tuple[str, str]], tokenizer,
             template: conversation.Template = conversation.DEFAULT) -> list[int]:
    """The prompt ids for the next assistant message: the same ids SFT trained on and ChatSession sends."""
    return conversation.prompt_ids(template, messages, tokenizer)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(req: Request, rid: str, model: str, created: int | None = None) -> dict[str, Any]:
    """The fields every response and chunk shares."""
    obj = ("chat.completion" if req.chat else "text_completion") + (".chunk" if req.stream and req.chat else "")
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model}


def choice(req: Request, index: int, text: str | None, finish_reason: str | None, first: bool = False,
           logprobs: dict[str, Any] | None = None):
    """One choice: full (non-streaming) or a delta (streaming); `logprobs` from jaxgpt.serve.logprobs."""
    if not req.chat:
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    if not req.stream:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
