"""`jaxgpt serve --exported DIR`: the same API from an exported artifact, in a process that cannot import
Flax or the model code, with the chat template the run recorded and the live model's logprobs; int8
exports serve too, and artifacts exported before scoring programs existed still serve."""

from __future__ import annotations

import json
import shutil
import signal

import httpx
import jax
import numpy as np
import openai
import pytest
from starlette.testclient import TestClient

from jaxgpt import config, conversation
from jaxgpt.api import LanguageModel
from jaxgpt.data import tokenizers
from jaxgpt.export import export_model
from jaxgpt.exported import load_exported
from jaxgpt.model import init_params
from jaxgpt.scoring import token_logprobs
from jaxgpt.serve import create_app
from serving import start_server_process

TEMPLATE = conversation.Template(name="test-chat", system="S:\n", user="Q:\n", assistant="A:\n")
# Runs `jaxgpt serve` with every import of these refused, so serving an export provably needs none of them.
SERVER = """
import sys
BLOCKED = {"flax", "jaxgpt.model", "jaxgpt.generate", "jaxgpt.scoring", "jaxgpt.api", "jaxgpt.train.loop"}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.split(".")[0] == "flax":
            raise ImportError(f"{name} is blocked: serving an export must not need it")
sys.meta_path.insert(0, Blocker())
from jaxgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def live():
    cfg = config.load(None, {"model.preset": "tiny", "model.vocab_size": 64})
    tok = tokenizers.CharTokenizer(list("abcdefghijklmnopqrstuvwxyzAQS ,.:\n"))
    params = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, init_params(cfg.model, jax.random.key(0)))
    return LanguageModel(cfg, params, tok, 7, TEMPLATE)


@pytest.fixture(scope="module")
def exported(live, tmp_path_factory):
    return export_model(live, tmp_path_factory.mktemp("exp") / "tiny-export", prompt_buckets=(16, 32),
                        max_new_tokens=24)


@pytest.fixture(scope="module")
def base_url(exported):
    proc, url = start_server_process(["-c", SERVER, "serve", "--exported", str(exported)], stream_chunk=4)
    yield url
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "blocked" not in output, output[-3000:]  # no request tried (and failed) to import the model code


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_export_records_the_chat_template(exported):
    assert json.loads((exported / conversation.FILE).read_text())["user"] == "Q:\n"
    assert load_exported(exported).template == TEMPLATE


def test_completion_greedy_equals_load_exported(client, exported):
    r = client.completions.create(model="tiny-export", prompt="hello wor", max_tokens=16, temperature=0)
    assert r.choices[0].text == load_exported(exported).generate("hello wor", 16, temperature=0.0)
    assert r.usage.prompt_tokens == 9
    sampled = [client.completions.create(model="tiny-export", prompt="abc", max_tokens=10, temperature=0.9,
                                         seed=3).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed gives the same sample again


def test_chat_uses_the_recorded_template_and_streams(client, exported):
    messages = [{"role": "user", "content": "hello"}]
    em = load_exported(exported)
    ids = conversation.prompt_ids(TEMPLATE, messages, em.tokenizer)
    expected = em.tokenizer.decode(em.generate_ids([ids], 16, temperature=0.0)[0])
    r = client.chat.completions.create(model="tiny-export", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == expected and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny-export", messages=messages, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_generation_past_the_exported_lengths_slides(client):
    r = client.completions.create(model="tiny-export", prompt="the quick brown fox", max_tokens=80, temperature=0)
    assert r.usage.completion_tokens == 80 or r.choices[0].finish_reason == "stop"


def test_models_health_metrics_and_page(base_url, client):
    card = client.models.retrieve("tiny-export")
    assert card.id == "tiny-export" and card.model_extra["max_model_len"] == 64
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"
    assert "jaxgpt_" in httpx.get(f"{base_url}/metrics").text
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_echo_logprobs_equal_the_live_model(base_url, live):
    tok = live.tokenizer
    texts = ["hello world", "abc", "the quick brown fox jumps over the lazy dog, again and again"]
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": texts, "echo": True, "logprobs": 3,
                                                       "max_tokens": 0}, timeout=120)
    assert r.status_code == 200, r.text
    rows = [tok.encode(t) for t in texts]
    want = token_logprobs(live.params, live.cfg.model, rows, n_vocab=tok.vocab_size, top_n=3)
    for choice, row, w, text in zip(r.json()["choices"], rows, want, texts):
        lp = choice["logprobs"]
        assert choice["text"] == text and lp["tokens"] == [tok.decode([i]) for i in row]
        assert lp["token_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:], w.logprob_T[1:], atol=1e-5)
        for top, ids, lps in zip(lp["top_logprobs"][1:], w.top_ids_TxK[1:], w.top_logprob_TxK[1:]):
            expected = {tok.decode([int(i)]): float(v) for i, v in zip(ids, lps)}
            assert set(expected) <= set(top)
            np.testing.assert_allclose([top[k] for k in expected], list(expected.values()), atol=1e-5)


def test_chat_logprobs_are_greedy_tokens_and_stream(client):
    body = dict(model="tiny-export", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0,
                logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**body)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert all(c.logprob == c.top_logprobs[0].logprob and c.token == c.top_logprobs[0].token for c in content)
    chunks = [c.choices[0] for c in client.chat.completions.create(**body, stream=True)]  # 4 tokens a chunk
    streamed = [t for c in chunks if c.logprobs is not None for t in c.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, content)) < 1e-5


def test_an_old_export_serves_and_answers_logprobs_with_a_clear_400(exported, tmp_path):
    old = shutil.copytree(exported, tmp_path / "format1")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["score_programs"], manifest["score_top"]  # as `jaxgpt export` wrote format 1
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with TestClient(create_app(load_exported(old), "old")) as http:
        for endpoint, body in (("completions", {"prompt": "abc", "max_tokens": 2, "logprobs": 1}),
                               ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "logprobs": True})):
            r = http.post(f"/v1/{endpoint}", json=body)
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "logprobs_not_supported" and error["param"] == "logprobs"
            assert "re-export it with `jaxgpt export`" in error["message"] and "\n" not in error["message"]
        r = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None  # still serving


def test_int8_export_serves_its_own_tokens(live, tmp_path):
    out = export_model(live, tmp_path / "q8", prompt_buckets=(16,), max_new_tokens=16, quantize="int8")
    em = load_exported(out)
    with TestClient(create_app(em, "q8")) as http:
        r = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == em.generate("abc", 12, temperature=0.0)


def test_cli_refuses_run_dir_options_with_exported(exported):
    from jaxgpt.cli import main

    assert main(["serve", "--exported", str(exported), "--quantize", "int8"]) == 2
