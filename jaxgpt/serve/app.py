"""HTTP routes (Starlette) for an OpenAI-compatible server, and `serve()` which runs them under uvicorn.

POST /v1/completions and /v1/chat/completions answer with JSON, or with server-sent events
(`data: {chunk}` lines, then `data: [DONE]`) when `stream` is true; GET /v1/models, /v1/models/{id},
/health and /metrics (Prometheus text); vLLM's /tokenize, /detokenize and /tokenizer_info. Every error
is OpenAI's error JSON with a 4xx/5xx status. Shutdown (SIGTERM, Ctrl-C): uvicorn stops accepting
connections and waits up to `graceful_s` for responses in flight, then the batcher fails whatever is
left with a 503 (a stream gets an error event and `[DONE]`).

`logprobs` (and `echo`) are computed after generation by one scoring pass over prompt + completion
(a ScoreJob through the same batcher), so they are the model's raw log-probabilities, before
temperature, top-k/top-p or penalties, as vLLM reports them by default. A stream carries each chunk's
logprobs: a chunk waits for a scoring pass over prompt + completion so far (jaxgpt.serve.logprobs.
StreamedChoice). `echo` does not stream (a 400); an artifact exported without scoring programs answers
`logprobs` with a 400 asking for a re-export.

GET / is a chat page (chat.html, beside this file): it streams replies from /v1/chat/completions.
A run dir is served through its LanguageModel, an exported artifact (`serve(exported=...)`) through
jaxgpt.exported with JAX alone: this module and the batcher import no model code (jaxgpt.serve.engines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxgpt.errors import JaxgptError
from jaxgpt.sampling import SamplingParams
from jaxgpt.serve import logprobs as logprobs_lib
from jaxgpt.serve import protocol
from jaxgpt.serve.batcher import PREFIX_CACHE_MB, Batcher, Job, ScoreJob
from jaxgpt.serve.metrics import CONTENT_TYPE, MetricsMiddleware
from jaxgpt.serve.protocol import ApiError, Limits

log = logging.getLogger("jaxgpt.serve")


@dataclass
class Serving:
    engine: Any  # jaxgpt.serve.engines: LiveEngine or ExportedEngine
    name: str
    limits: Limits
    batcher: Batcher
    created: int


def create_app(model, name: str = "jaxgpt", max_batch: int = 8, max_wait_ms: float = 5.0, chunk: int = 8,
               limits: Limits | None = None, batching: str = "continuous",
               prefix_cache_mb: float = PREFIX_CACHE_MB) -> Starlette:
    """The ASGI app serving `model` (a LanguageModel or an ExportedModel); max_batch=1 serves one request
    at a time; `batching` is 'continuous' or 'dynamic', `prefix_cache_mb` the budget for reused
    conversation caches (0: off) (jaxgpt.serve.batcher)."""
    batcher = Batcher(model, max_batch, max_wait_ms, chunk, batching=batching, prefix_cache_mb=prefix_cache_mb)
    block = batcher.engine.block_size
    # Generation slides past the context (jaxgpt.generate), so max_tokens may exceed it.
    limits = limits or Limits(max_prompt_tokens=block - 1, max_new_tokens=max(4096, block))
    serving = Serving(batcher.engine, name, limits, batcher, int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        serving.batcher.start()
        yield
        await asyncio.to_thread(serving.batcher.close)

    routes = [
        Route("/", _page, methods=["GET"]),
        Route("/v1/completions", _completions, methods=["POST"]),
        Route("/v1/chat/completions", _chat, methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", _model, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        # vLLM's tokenizer routes: lm-evaluation-harness's tokenizer_backend=remote works with any tokenizer.
        Route("/tokenize", _tokenize, methods=["POST"]),
        Route("/detokenize", _detokenize, methods=["POST"]),
        Route("/tokenizer_info", _tokenizer_info, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    middleware = [Middleware(MetricsMiddleware, metrics=lambda: serving.batcher.metrics)]
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware)
    app.state.serving = serving
    return app


async def _api_error(request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                 type=kind).body(), status_code=exc.status_code)


async def _server_error(request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                        status_code=500)


async def _read_json(request: HttpRequest, limits: Limits) -> Any:
    """The body as JSON, whatever the Content-Type (curl -d sends form-encoded); size-capped while reading."""
    too_big = ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_body_bytes:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limits.max_body_bytes:
            raise too_big
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}: {body[e.start]:#04x})") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise ApiError(400, "the request body has a number with too many digits") from None


def _non_finite(name: str):
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ApiError(400, f"the request body has a number out of range: {text[:40]}")
    return value


async def _completions(request: HttpRequest):
    return await _generate(request, chat=False)


async def _chat(request: HttpRequest):
    return await _generate(request, chat=True)


def _encode(serving: Serving, req: protocol.Request, prompt) -> list[int]:
    tok = serving.engine.tokenizer
    param = "messages" if req.chat else "prompt"
    if isinstance(prompt, list) and not req.chat:  # token ids, as lm-evaluation-harness sends them
        bad = next((t for t in prompt if t >= tok.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is out of range; this model's vocabulary has {tok.vocab_size} "
                                "ids", param=param)
        return list(prompt)
    try:
        ids = protocol.chat_ids(prompt, tok, serving.engine.template) if req.chat else tok.encode(prompt)
    except JaxgptError as e:
        raise ApiError(400, str(e), param=param) from None
    return ids or [tok.eos_id]  # an empty prompt starts from end-of-text, as jaxgpt.generate does


def _prompt_ids(serving: Serving, req: protocol.Request) -> list[list[int]]:
    """Each prompt's ids, checked against the context (a pure scoring request may fill all of it)."""
    block, limits = serving.engine.block_size, serving.limits
    most = block if req.max_tokens == 0 else min(limits.max_prompt_tokens, block - 1)
    out = []
    for prompt in req.prompts:
        ids = _encode(serving, req, prompt)
        if len(ids) > most:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model takes at most {most}",
                           param="messages" if req.chat else "prompt", code="context_length_exceeded")
        out.append(ids)
    return out


def _jobs(serving: Serving, req: protocol.Request, prompts: list[list[int]], emit) -> list[Job]:
    """One job per (prompt, n); choice index = prompt index * n + sample index, as OpenAI numbers them."""
    block, limits = serving.engine.block_size, serving.limits
    sampling = SamplingParams(req.temperature, req.top_k, req.top_p, req.repetition_penalty)
    seed = secrets.randbits(31) if req.seed is None else req.seed
    jobs = []
    for i, ids in enumerate(prompts):
        room = block - len(ids)
        # OpenAI's defaults: 16 tokens for completions, the rest of the context for chat.
        max_tokens = req.max_tokens or (16 if not req.chat else min(room, limits.max_new_tokens))
        # Past the context the window slides, except where logprobs must score the whole text in one window.
        if len(ids) + max_tokens > block and req.logprobs is not None:
            raise ApiError(400, f"this model's context is {block} tokens; the prompt is {len(ids)} and max_tokens "
                                f"{max_tokens}: with logprobs, lower max_tokens to {room} or less",
                           param="max_tokens", code="context_length_exceeded")
        for k in range(req.n):
            index = i * req.n + k
            jobs.append(Job(ids, max_tokens, sampling, (seed + index) % 2**31, req.stop,
                            lambda ev, index=index: emit((index, *ev))))
    return jobs


def _channel() -> tuple[asyncio.Queue, Any]:
    """A queue on this event loop and a thread-safe `emit` that feeds it from the batcher's thread."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(ev) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, ev)

    return events, emit


async def _generate(request: HttpRequest, chat: bool):
    serving: Serving = request.app.state.serving
    req = protocol.parse(await _read_json(request, serving.limits), chat, serving.limits)
    if req.model is not None and req.model != serving.name:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{serving.name}'",
                       param="model", code="model_not_found")
    if req.logprobs is not None and not serving.engine.can_score:
        raise ApiError(400, "this exported artifact holds no scoring program (it was exported before jaxgpt "
                            "exported one); re-export it with `jaxgpt export` for logprobs",
                       param="logprobs", code="logprobs_not_supported")
    events, emit = _channel()
    prompts = _prompt_ids(serving, req)
    prompt_lens = [len(ids) for ids in prompts]
    jobs = _jobs(serving, req, prompts, emit) if req.max_tokens != 0 else []
    serving.batcher.submit(jobs)
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    if req.stream:
        return StreamingResponse(_sse(serving, req, rid, jobs, prompts, events, emit), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    n_choices = len(prompts) * req.n
    texts, reasons, n_tokens = [""] * n_choices, ["length"] * n_choices, 0  # max_tokens 0: nothing generated
    try:
        for _ in range(len(jobs)):
            while True:
                index, kind, *rest = await events.get()
                if kind == "text":
                    texts[index] += rest[0]
                    continue
                if kind == "error":
                    raise ApiError(rest[0], rest[1], type="server_error")
                reasons[index], n_tokens = rest[0], n_tokens + rest[1]
                break
    finally:
        for job in jobs:  # a failed or abandoned request frees its rows
            job.cancelled = True
    rows = [prompts[i // req.n] for i in range(n_choices)]
    new_ids = [logprobs_lib.shown_ids(serving.engine.tokenizer, job.ids, text)
               for job, text in zip(jobs, texts)] or [[]] * n_choices
    logprobs = await _logprobs(serving, req, rows, new_ids)
    if req.echo:  # the prompt as sent (a string), or as its ids decode
        texts = [(p if isinstance(p, str) else serving.engine.tokenizer.decode(ids)) + t
                 for p, ids, t in zip((req.prompts[i // req.n] for i in range(n_choices)), rows, texts)]
    body = protocol.envelope(req, rid, serving.name)
    body["choices"] = [protocol.choice(req, i, texts[i], reasons[i], logprobs=logprobs[i]) for i in range(n_choices)]
    body["usage"] = protocol.usage(sum(prompt_lens) * req.n, n_tokens)
    return JSONResponse(body)


async def _logprobs(serving: Serving, req: protocol.Request, prompts: list[list[int]],
                    new_ids: list[list[int]]) -> list[dict[str, Any] | None]:
    """Each choice's logprobs object (None when not asked), scored in one pass over prompt + completion."""
    if req.logprobs is None:
        return [None] * len(prompts)
    rows = [p + n for p, n in zip(prompts, new_ids)]
    unique = list(dict.fromkeys(map(tuple, rows)))  # n > 1 with max_tokens 0 or greedy: score once
    events, emit = _channel()
    jobs = [ScoreJob(list(row), req.logprobs, lambda ev, k=k: emit((k, *ev))) for k, row in enumerate(unique)]
    serving.batcher.submit(jobs)
    results: list[Any] = [None] * len(jobs)
    try:
        for _ in jobs:
            k, kind, *rest = await events.get()
            if kind == "error":
                raise ApiError(rest[0], rest[1], type="server_error")
            results[k] = rest[0]
    finally:
        for job in jobs:
            job.cancelled = True
    by_row = dict(zip(unique, results))
    tok, out = serving.engine.tokenizer, []
    for prompt, row in zip(prompts, rows):
        if req.chat:
            out.append(logprobs_lib.chat_logprobs(tok, row, by_row[tuple(row)], len(prompt), req.logprobs))
        else:
            first = 0 if req.echo else len(prompt)
            out.append(logprobs_lib.completion_logprobs(tok, row, by_row[tuple(row)], first, req.logprobs))
    return out


def _sse_line(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(serving: Serving, req, rid, jobs, prompts, events, emit):
    """Server-sent events: one chunk per text piece and per finished choice, then usage (if asked), [DONE].
    With logprobs, each piece goes out once a scoring pass (a ScoreJob on `emit`) has covered its tokens."""
    created, n_tokens, name = int(time.time()), 0, serving.name
    tok = serving.engine.tokenizer
    streamed = [logprobs_lib.StreamedChoice(tok, prompts[i // req.n], req.chat, req.logprobs)
                for i in range(len(jobs))] if req.logprobs is not None else None
    score_jobs: list[ScoreJob] = []

    def chunk(choices) -> str:
        return _sse_line({**protocol.envelope(req, rid, name, created), "choices": choices})

    def pieces(index: int, kind: str, rest) -> list[tuple[str, Any, str | None]]:
        """(text, logprobs, finish_reason) ready to send after this event; queues the scoring it needs."""
        if streamed is None:
            return [(rest[0], None, None) if kind == "text" else ("", None, rest[0])]
        held = streamed[index]
        if kind == "scored":
            ready, row = held.scored(rest[0])
        elif kind == "text":
            ready, row = held.add(rest[0], list(jobs[index].ids))
        else:  # done: the final ids may end in tokens that add no text
            ready, row = held.add("", list(jobs[index].ids), finish_reason=rest[0])
        if row is not None:
            score_jobs.append(ScoreJob(row, req.logprobs, lambda ev, index=index: emit((index, *ev))))
            serving.batcher.submit(score_jobs[-1:])
        return ready

    try:
        if req.chat:  # OpenAI opens each chat choice with the assistant role
            yield chunk([protocol.choice(req, i, "", None, first=True) for i in range(len(jobs))])
        left = len(jobs)
        while left:
            index, kind, *rest = await events.get()
            if kind == "error":
                yield _sse_line(ApiError(rest[0], rest[1], type="server_error").body())
                break
            if kind == "done":
                n_tokens += rest[1]
            try:
                ready = pieces(index, kind, rest)
            except ApiError as e:  # a scoring pass could not be queued (the server is full or closing)
                yield _sse_line(e.body())
                break
            for text, logprobs, reason in ready:
                left -= reason is not None
                yield chunk([protocol.choice(req, index, text, reason, logprobs=logprobs)])
        else:
            if req.include_usage:
                yield _sse_line({**protocol.envelope(req, rid, name, created), "choices": [],
                                 "usage": protocol.usage(sum(map(len, prompts)) * req.n, n_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs + score_jobs:  # the client went away (or we are done): the worker drops these rows
            job.cancelled = True


async def _page(request: HttpRequest):
    # Package data, read per request: small, and an edited page shows on reload.
    return HTMLResponse(resources.files("jaxgpt.serve").joinpath("chat.html").read_text(encoding="utf-8"))


async def _models(request: HttpRequest):
    serving: Serving = request.app.state.serving
    return JSONResponse({"object": "list", "data": [_model_card(serving)]})


async def _model(request: HttpRequest):
    serving: Serving = request.app.state.serving
    if request.path_params["model_id"] != serving.name:
        raise ApiError(404, f"the model '{request.path_params['model_id']}' does not exist", param="model",
                       code="model_not_found", type="not_found_error")
    return JSONResponse(_model_card(serving))


def _model_card(serving: Serving) -> dict[str, Any]:
    return {"id": serving.name, "object": "model", "created": serving.created, "owned_by": "jaxgpt",
            "max_model_len": serving.engine.block_size}


async def _health(request: HttpRequest):
    serving: Serving = request.app.state.serving
    return JSONResponse({"status": "ok", "model": serving.name, "pending": serving.batcher.pending,
                         "max_batch": serving.batcher.max_batch, **serving.batcher.stats})


async def _metrics(request: HttpRequest):
    serving: Serving = request.app.state.serving
    return Response(serving.batcher.metrics.render(), media_type=CONTENT_TYPE)


async def _tokenize(request: HttpRequest):
    serving: Serving = request.app.state.serving
    text = protocol.parse_tokenize(await _read_json(request, serving.limits))
    try:
        ids = serving.engine.tokenizer.encode(text)
    except JaxgptError as e:
        raise ApiError(400, str(e), param="prompt") from None
    return JSONResponse({"count": len(ids), "max_model_len": serving.engine.block_size, "tokens": ids,
                         "token_strs": None})


async def _detokenize(request: HttpRequest):
    serving: Serving = request.app.state.serving
    tok = serving.engine.tokenizer
    ids = protocol.parse_detokenize(await _read_json(request, serving.limits), tok.vocab_size)
    return JSONResponse({"prompt": tok.decode(ids)})


async def _tokenizer_info(request: HttpRequest):
    serving: Serving = request.app.state.serving
    tok = serving.engine.tokenizer
    # No special-token strings: /tokenize treats text as text, so "<|endoftext|>" would not give eos_token_id.
    return JSONResponse({"tokenizer_class": type(tok).__name__, "eos_token": None, "bos_token": None,
                         "pad_token": None, "eos_token_id": tok.eos_id, "vocab_size": tok.vocab_size,
                         "model_max_length": serving.engine.block_size})


def serve(run_dir: str | None, host: str = "127.0.0.1", port: int = 8000, checkpoint: str = "best",
          quantize: str | None = None, max_batch: int = 8, batching: str = "continuous", name: str | None = None,
          max_wait_ms: float = 5.0, chunk: int = 8, graceful_s: int = 30, log_level: str = "info",
          exported: str | None = None, prefix_cache_mb: float | None = None) -> None:
    """Load a run dir (or, with `exported`, an exported artifact instead) and serve it until SIGTERM/SIGINT.
    `batching`: 'continuous', 'dynamic' or 'off' (one request at a time); `prefix_cache_mb` None: the default."""
    import signal
    import sys
    from pathlib import Path

    import uvicorn

    # SIGTERM exits 0 while loading, and after uvicorn's graceful shutdown (uvicorn re-raises the signal).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    source = exported or run_dir
    if exported:
        from jaxgpt.exported import load_exported

        model = load_exported(exported)  # JAX alone: no Flax, no model code
    else:
        from jaxgpt.api import load

        model = load(run_dir, checkpoint, quantize=quantize)  # refuses a classifier run dir before binding the port
    name = name or Path(source).resolve().name
    max_batch = 1 if batching == "off" else max_batch
    batching = "dynamic" if batching == "off" else batching
    app = create_app(model, name, max_batch, max_wait_ms, chunk, batching=batching,
                     prefix_cache_mb=PREFIX_CACHE_MB if prefix_cache_mb is None else prefix_cache_mb)
    mode = "continuous" if app.state.serving.batcher.continuous else "dynamic"
    log.warning("serving %s (%s) on http://%s:%d/v1, chat page at http://%s:%d/ (max_batch %d, %s batching)", name,
                source, host, port, host, port, max_batch, mode)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=graceful_s)).run()
