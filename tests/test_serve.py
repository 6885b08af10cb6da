"""The OpenAI-compatible server, driven by the real `openai` client over loopback.

One tiny model is trained for a few steps; one server (uvicorn in a thread) serves it to every test here,
and each bad request is followed by a good one to show the server kept serving. The SIGTERM test starts
`jaxgpt serve` as a subprocess.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal

import httpx
import openai
import pytest

import jaxgpt
from jaxgpt.generate import SamplingParams
from jaxgpt.serve import create_app
from jaxgpt.serve.batcher import Batcher, Job
from serving import serve_in_thread, start_server_process

PROMPTS = ["The class", "A function is", "import os", "Return the"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_tiny):
    return train_tiny(tmp_path_factory.mktemp("serve_run") / "run", {
        "model.block_size": 128, "train.steps": 20, "train.batch_size": 8, "train.lr": 3e-3,
        "train.warmup_steps": 5, "train.eval_every": 20, "train.save_every": 20, "train.log_every": 10})


@pytest.fixture(scope="module")
def model(run_dir):
    return jaxgpt.load(run_dir)


@pytest.fixture(scope="module")
def base_url(model):
    with serve_in_thread(create_app(model, "tiny", max_batch=8, max_wait_ms=20)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_completion_greedy_equals_library(client, model):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == model.generate(PROMPTS[0], max_new_tokens=16, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(PROMPTS[0]) and 0 < r.usage.completion_tokens <= 16


def test_generation_past_the_context_slides_as_the_library_does(client, model):
    kw = dict(max_tokens=300, temperature=0.8, seed=5)  # 300 new tokens on a 128-token model
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], **kw)
    want = model.generate([PROMPTS[1]], max_new_tokens=300, temperature=0.8, seed=[5])[0]  # the server's row key
    assert r.choices[0].text == want and len(want) > 128  # char tokenizer: one token a character
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[1], stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == want
    with pytest.raises(openai.BadRequestError, match="with logprobs"):  # scoring needs one window
        client.completions.create(model="tiny", prompt=PROMPTS[1], logprobs=1, **kw)


def test_streaming_completion_equals_non_streaming(client):
    full = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0.8, seed=7)
    stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0.8, seed=7,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # it really streamed in pieces


def test_chat_and_chat_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a class?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    reply = r.choices[0].message
    assert r.object == "chat.completion" and reply.role == "assistant" and isinstance(reply.content, str)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_n_prompts_and_stop(client):
    r = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=2, max_tokens=16, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, seed=1, stop=["e"])
    assert "e" not in r.choices[0].text


def test_concurrent_requests_are_batched_and_match_alone(client, base_url, model):
    alone = [model.generate(p, max_new_tokens=16, temperature=0) for p in PROMPTS]
    before = httpx.get(f"{base_url}/health").json()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=16,
                                                                temperature=0).choices[0].text, PROMPTS * 2))
    after = httpx.get(f"{base_url}/health").json()
    assert got == alone * 2
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < 8


BAD = [  # (body bytes, endpoint, status, param or None)
    (b'{"prompt": "x", ', "completions", 400, None),  # malformed JSON
    (b'{"prompt": "x", "max_tokens": 4, "temprature": 0.5}', "completions", 400, "temprature"),
    (b'{"prompt": "x", "max_tokens": -3}', "completions", 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 10000000000}', "completions", 400, "max_tokens"),
    (b'{"messages": [], "max_tokens": 4}', "chat/completions", 400, "messages"),
    (b'{"prompt": "caf\xe9 \xff"}', "completions", 400, None),  # Latin-1 bytes, not UTF-8
    (b'[1, 2]', "completions", 400, None),
    (b'{"prompt": "x", "temperature": "hot"}', "completions", 400, "temperature"),
    (json.dumps({"prompt": "a" * 1000}).encode(), "completions", 400, "prompt"),  # longer than the context
    (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), "completions", 404, "model"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "chat/completions", 400, "messages[0].role"),
    (b'{"prompt": "' + b"a" * (2 << 20) + b'"}', "completions", 413, None),  # over the body limit
]


@pytest.mark.parametrize("body,endpoint,status,param", BAD)
def test_bad_request_gets_openai_error_and_server_keeps_serving(base_url, client, body, endpoint, status, param):
    r = httpx.post(f"{base_url}/v1/{endpoint}", content=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2, temperature=0).choices


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_close_fails_queued_jobs_with_503(model):
    events = []
    batcher = Batcher(model)  # never started: every job stays queued
    batcher.submit([Job([1, 2], 4, SamplingParams(0.0), 0, [], events.append)])
    batcher.close()
    assert events == [("error", 503, "the server shut down before this request ran")]
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit([Job([1], 4, SamplingParams(0.0), 0, [], events.append)])


def test_sigterm_finishes_the_stream_in_flight_then_exits(run_dir):
    proc, url = start_server_process(["-m", "jaxgpt.cli", "serve", "--run-dir", str(run_dir)], stream_chunk=2)
    try:
        body = {"prompt": "The", "max_tokens": 16, "temperature": 1.0, "seed": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
