"""HTTP routes (Starlette) for an OpenAI-compatible server, and `serve()` which runs them under uvicorn.

POST /v1/completions and /v1/chat/completions answer with JSON, or with server-sent events
(`data: {chunk}` lines, then `data: [DONE]`) when `stream` is true; GET /v1/models, /v1/models/{id} and
/health. Every error is OpenAI's error JSON with a 4xx/5xx status. Shutdown (SIGTERM, Ctrl-C): uvicorn
stops accepting connections and waits up to `graceful_s` for responses in flight, then the batcher fails
whatever is left with a 503 (a stream gets an error event and `[DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from jaxgpt.errors import JaxgptError
from jaxgpt.generate import SamplingParams
from jaxgpt.serve import protocol
from jaxgpt.serve.batcher import Batcher, Job
from jaxgpt.serve.protocol import ApiError, Limits

log = logging.getLogger("jaxgpt.serve")


@dataclass
class Serving:
    model: Any  # jaxgpt.api.LanguageModel
    name: str
    limits: Limits
    batcher: Batcher
    created: int


def create_app(model, name: str = "jaxgpt", max_batch: int = 8, max_wait_ms: float = 5.0, chunk: int = 8,
               limits: Limits | None = None) -> Starlette:
    """The ASGI app serving `model` (a LanguageModel); max_batch=1 serves one request at a time."""
    block = model.cfg.model.block_size
    limits = limits or Limits(max_prompt_tokens=block - 1, max_new_tokens=block - 1)
    serving = Serving(model, name, limits, Batcher(model, max_batch, max_wait_ms, chunk), int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        serving.batcher.start()
        yield
        await asyncio.to_thread(serving.batcher.close)

    routes = [
        Route("/v1/completions", _completions, methods=["POST"]),
        Route("/v1/chat/completions", _chat, methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", _model, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
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
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


async def _completions(request: HttpRequest):
    return await _generate(request, chat=False)


async def _chat(request: HttpRequest):
    return await _generate(request, chat=True)


def _encode(serving: Serving, req: protocol.Request, prompt) -> list[int]:
    tok = serving.model.tokenizer
    try:
        ids = protocol.chat_ids(prompt, tok, serving.model.template) if req.chat else tok.encode(prompt)
    except JaxgptError as e:
        raise ApiError(400, str(e), param="messages" if req.chat else "prompt") from None
    return ids or [tok.eos_id]  # an empty prompt starts from end-of-text, as jaxgpt.generate does


def _jobs(serving: Serving, req: protocol.Request, emit) -> tuple[list[Job], list[int]]:
    """One job per (prompt, n); choice index = prompt index * n + sample index, as OpenAI numbers them."""
    block, limits = serving.model.cfg.model.block_size, serving.limits
    sampling = SamplingParams(req.temperature, req.top_k, req.top_p, req.repetition_penalty)
    seed = secrets.randbits(31) if req.seed is None else req.seed
    jobs, prompt_lens = [], []
    for i, prompt in enumerate(req.prompts):
        ids = _encode(serving, req, prompt)
        room = block - len(ids)
        if len(ids) > limits.max_prompt_tokens or room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model takes at most "
                                f"{min(limits.max_prompt_tokens, block - 1)}", param="messages" if req.chat else "prompt",
                           code="context_length_exceeded")
        # OpenAI's defaults: 16 tokens for completions, the rest of the context for chat.
        max_tokens = req.max_tokens or (16 if not req.chat else min(room, limits.max_new_tokens))
        if len(ids) + max_tokens > block:
            raise ApiError(400, f"this model's context is {block} tokens; the prompt is {len(ids)} and max_tokens "
                                f"{max_tokens}: lower max_tokens to {room} or less", param="max_tokens",
                           code="context_length_exceeded")
        prompt_lens.append(len(ids))
        for k in range(req.n):
            index = i * req.n + k
            jobs.append(Job(ids, max_tokens, sampling, (seed + index) % 2**31, req.stop,
                            lambda ev, index=index: emit((index, *ev))))
    return jobs, prompt_lens


async def _generate(request: HttpRequest, chat: bool):
    serving: Serving = request.app.state.serving
    req = protocol.parse(await _read_json(request, serving.limits), chat, serving.limits)
    if req.model is not None and req.model != serving.name:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{serving.name}'",
                       param="model", code="model_not_found")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(ev) -> None:  # called from the batcher's thread
        with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, ev)

    jobs, prompt_lens = _jobs(serving, req, emit)
    serving.batcher.submit(jobs)
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    if req.stream:
        return StreamingResponse(_sse(req, rid, serving.name, jobs, prompt_lens, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, reasons, n_tokens = [""] * len(jobs), [None] * len(jobs), 0
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
    body = protocol.envelope(req, rid, serving.name)
    body["choices"] = [protocol.choice(req, i, texts[i], reasons[i]) for i in range(len(jobs))]
    body["usage"] = protocol.usage(sum(prompt_lens) * req.n, n_tokens)
    return JSONResponse(body)


def _sse_line(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(req, rid, name, jobs, prompt_lens, events):
    """Server-sent events: one chunk per text piece and per finished choice, then usage (if asked), [DONE]."""
    created, n_tokens = int(time.time()), 0

    def chunk(choices) -> str:
        return _sse_line({**protocol.envelope(req, rid, name, created), "choices": choices})

    try:
        if req.chat:  # OpenAI opens each chat choice with the assistant role
            yield chunk([protocol.choice(req, i, "", None, first=True) for i in range(len(jobs))])
        left = len(jobs)
        while left:
            index, kind, *rest = await events.get()
            if kind == "text":
                yield chunk([protocol.choice(req, index, rest[0], None)])
            elif kind == "done":
                left, n_tokens = left - 1, n_tokens + rest[1]
                yield chunk([protocol.choice(req, index, "", rest[0])])
            else:
                yield _sse_line(ApiError(rest[0], rest[1], type="server_error").body())
                break
        else:
            if req.include_usage:
                yield _sse_line({**protocol.envelope(req, rid, name, created), "choices": [],
                                 "usage": protocol.usage(sum(prompt_lens) * req.n, n_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:  # the client went away (or we are done): the worker drops these rows
            job.cancelled = True


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
            "max_model_len": serving.model.cfg.model.block_size}


async def _health(request: HttpRequest):
    serving: Serving = request.app.state.serving
    return JSONResponse({"status": "ok", "model": serving.name, "pending": serving.batcher.pending,
                         "max_batch": serving.batcher.max_batch, **serving.batcher.stats})


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, checkpoint: str = "best",
          quantize: str | None = None, max_batch: int = 8, batching: bool = True, name: str | None = None,
          max_wait_ms: float = 5.0, chunk: int = 8, graceful_s: int = 30, log_level: str = "info") -> None:
    """Load a run dir and serve it until SIGTERM/SIGINT."""
    import signal
    import sys
    from pathlib import Path

    import uvicorn

    from jaxgpt.api import load

    # SIGTERM exits 0 while loading, and after uvicorn's graceful shutdown (uvicorn re-raises the signal).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    model = load(run_dir, checkpoint, quantize=quantize)  # refuses a classifier run dir before binding the port
    name = name or Path(run_dir).resolve().name
    app = create_app(model, name, max_batch if batching else 1, max_wait_ms, chunk)
    log.warning("serving %s (%s) on http://%s:%d/v1 (max_batch %d)", name, run_dir, host, port,
                max_batch if batching else 1)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=graceful_s)).run()
