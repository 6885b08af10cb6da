"""Continuous batching (jaxgpt.serve.slots through the Batcher): requests join and leave the running decode.

The model is a tiny random one (weights scaled up so its tokens vary), driven through the Batcher directly:
each request's tokens are checked against jaxgpt.generate run on that request alone. A conversation's turns
reuse the cache of the turn before (the prefix cache) and give the tokens they give without it.
"""

from __future__ import annotations

import logging
import threading
import time

import jax
import pytest

from jaxgpt import config
from jaxgpt.api import LanguageModel
from jaxgpt.data import tokenizers
from jaxgpt.generate import SamplingParams, generate_ids, prompt_bucket
from jaxgpt.model import init_params
from jaxgpt.serve.batcher import Batcher, Job, ScoreJob
from jaxgpt.serve.slots import prefiller, shifter, stepper

CHUNK = 4
REFERENCE = 64  # new tokens of every reference generation (block_size 128)
GREEDY = SamplingParams(0.0)


@pytest.fixture(scope="module")
def model():
    cfg = config.load(None, {"model.preset": "tiny", "model.vocab_size": 64, "model.block_size": 128})
    tok = tokenizers.CharTokenizer(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.:!?'\n"))
    params = jax.tree.map(lambda a: a * 3 if a.ndim > 1 else a, init_params(cfg.model, jax.random.key(1)))
    return LanguageModel(cfg, params, tok, 0)


class Request:
    """A job whose events are kept with the time they arrived."""

    def __init__(self, prompt: str, model, max_tokens: int, sampling=GREEDY, seed: int = 0, stops=()):
        self.events: list[tuple[float, tuple]] = []
        self.done = threading.Event()
        self.prompt_ids = model.tokenizer.encode(prompt)
        self.job = Job(self.prompt_ids, max_tokens, sampling, seed, list(stops), self._emit)

    def _emit(self, ev: tuple) -> None:
        self.events.append((time.monotonic(), ev))
        if ev[0] in ("done", "error"):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(ev[1] for _, ev in self.events if ev[0] == "text")

    def first(self, kind: str) -> float:
        return next(t for t, ev in self.events if ev[0] == kind)


def alone(model, r: Request) -> list[int]:
    """The request's tokens from jaxgpt.generate, run by itself (the server's row key: seed=[seed]).

    Always REFERENCE tokens, cut to max_tokens (a row's first n tokens do not depend on how many follow),
    so the reference compiles once per prompt bucket."""
    new = generate_ids(model.params, model.cfg.model, [r.prompt_ids], REFERENCE, eos_id=model.tokenizer.eos_id,
                       n_vocab=model.tokenizer.vocab_size, sampling=r.job.sampling, seed=[r.job.seed])[0]
    return new[:r.job.max_new_tokens]


@pytest.fixture
def batcher(model):
    b = Batcher(model, max_batch=4, chunk=CHUNK)
    b.start()
    yield b
    b.close()


def wait(requests, timeout=120):
    for r in requests:
        assert r.done.wait(timeout), "a request did not finish"
        assert r.events[-1][1][0] == "done", r.events[-1]


def test_greedy_rows_arriving_at_different_times_equal_generate(model, batcher):
    specs = [("The", 40), ("a longer prompt, with more in it", 9), ("x", 3), ("Once upon a time", 20),
             ("ab", 30), ("Hello there, friend", 12), ("Q", 16)]
    requests = [Request(p, model, n) for p, n in specs]
    stepper.cache_clear()  # the cache is per process: count only this model's decode programs
    batcher.submit([requests[0].job])
    for r in requests[1:]:  # the rest arrive while earlier rows decode, more than there are slots
        time.sleep(0.05)
        batcher.submit([r.job])
    wait(requests)
    for r in requests:
        assert r.job.ids == alone(model, r)
        assert r.text == model.tokenizer.decode(r.job.ids)
    # Full-length rows queued at once keep the slots busy for 4 x 130 / 4 decode steps: more than the L slots
    # past cur's start, so the write pointer runs past the cache's end and the rows shift.
    again = [Request(p, model, n, SamplingParams(0.0, min_new_tokens=n)) for p, n in specs * 4]
    batcher.submit([r.job for r in again])
    wait(again)
    for r in again:
        assert r.job.ids == alone(model, r) and len(r.job.ids) == r.job.max_new_tokens
    assert batcher.stats["largest_batch"] == 4  # rows really shared the slots
    assert shifter(model.cfg.model)._cache_size() == 1
    # Decode windows of 16, 32, 64, 128 or 256 cache slots, over slot 0 alone or all 4 slots.
    assert stepper.cache_info().currsize <= 5 * 2
    buckets = {prompt_bucket(len(r.prompt_ids)) for r in requests}
    assert prefiller(model.cfg.model)._cache_size() == len(buckets)  # one prefill program per prompt bucket


def test_a_short_request_arriving_mid_decode_finishes_before_the_long_one(model, batcher):
    long, short = Request("The", model, 60), Request("ab", model, 6)
    batcher.submit([long.job])
    while not long.events:  # the long row is decoding
        time.sleep(0.005)
    batcher.submit([short.job])
    wait([long, short])
    assert short.first("done") < long.first("done")
    assert short.events[0][0] < long.events[-1][0]
    assert long.job.ids == alone(model, long) and short.job.ids == alone(model, short)


def test_a_row_samples_the_same_tokens_alone_and_among_others(model, batcher):
    mine = dict(prompt="Once", max_tokens=30, sampling=SamplingParams(0.9, top_k=20, repetition_penalty=1.2), seed=7)
    solo = Request(mine["prompt"], model, mine["max_tokens"], mine["sampling"], mine["seed"])
    batcher.submit([solo.job])
    wait([solo])
    others = [Request("The", model, 25, SamplingParams(1.3, top_p=0.8), 1), Request("xyz", model, 12, GREEDY),
              Request("Hello", model, 40, SamplingParams(0.7, min_new_tokens=5), 2)]
    crowd = Request(mine["prompt"], model, mine["max_tokens"], mine["sampling"], mine["seed"])
    batcher.submit([others[0].job, others[1].job])
    time.sleep(0.05)
    batcher.submit([crowd.job, others[2].job])
    wait([crowd, *others])
    assert crowd.job.ids == solo.job.ids == alone(model, solo)
    for r in others:
        assert r.job.ids == alone(model, r)


class Compiles(logging.Handler):
    """Counts the programs JAX compiles while it is installed (jax_log_compiles on)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Compiling "):
            self.names.append(record.getMessage().split(" with ")[0])

    def __enter__(self):
        jax.config.update("jax_log_compiles", True)
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self)
        jax.config.update("jax_log_compiles", False)


def test_a_repeated_request_compiles_nothing(model):
    def work(b):
        first = Request("Hello there", model, 40)  # a kept prefix too short to resume from; a shift is due
        b.submit([first.job])
        wait([first])
        with Compiles() as compiles:
            again = Request("Hello there", model, 40)
            b.submit([again.job])
            wait([again])
        return first, again, compiles.names

    (first, again, compiled), _ = run_batcher(model, 1, work)
    assert compiled == []
    assert again.job.ids == first.job.ids == alone(model, first)


def test_dynamic_batching_gives_the_same_tokens(model):
    b = Batcher(model, max_batch=4, chunk=CHUNK, batching="dynamic")
    b.start()
    try:
        requests = [Request(p, model, n, SamplingParams(0.8), seed) for p, n, seed in
                    [("The", 20, 3), ("ab", 7, 4), ("Once upon", 13, 5)]]
        b.submit([r.job for r in requests])
        wait(requests)
    finally:
        b.close()
    assert not b.continuous
    for r in requests:
        assert r.job.ids == alone(model, r)


def test_stop_strings_cancellation_scoring_and_sliding_share_the_worker(model, batcher):
    full = Request("The", model, 30)
    batcher.submit([full.job])
    wait([full])
    stop = full.text[10:12]
    stopped = Request("The", model, 30, stops=[stop])
    cancelled = Request("Once upon", model, 60)
    sliding = Request("ab", model, 150, SamplingParams(0.8), seed=9)  # 2 + 150 > 128: the window slides
    scored = []
    score = ScoreJob(model.tokenizer.encode("The cat"), 2, lambda ev: scored.append(ev))
    batcher.submit([cancelled.job])
    while not cancelled.events:
        time.sleep(0.005)
    cancelled.job.cancelled = True  # the client went away: its slot frees at the next chunk
    batcher.submit([stopped.job, sliding.job, score])
    wait([stopped, sliding])
    assert stopped.text == full.text[:full.text.index(stop)] and stopped.events[-1][1][1] == "stop"
    assert sliding.job.ids == model.tokenizer.encode(
        model.generate(["ab"], max_new_tokens=150, temperature=0.8, seed=[9])[0])
    assert scored and scored[0][0] == "scored"
    assert len(cancelled.job.ids) < 60 and not cancelled.done.is_set()


def converse(model, batcher, turns: list, max_tokens: int = 12) -> list[Request]:
    """A chat-like conversation: each prompt is the last prompt, its reply's tokens and the next message
    (text, or token ids)."""
    done: list[Request] = []
    ids: list[int] = []
    for message in turns:
        r = Request("", model, max_tokens)
        message_ids = message if isinstance(message, list) else model.tokenizer.encode(message)
        r.prompt_ids = r.job.prompt_ids = ids + message_ids
        batcher.submit([r.job])
        wait([r])
        ids = r.prompt_ids + r.job.ids
        done.append(r)
    return done


TURNS = ["Hello there. ", "And then? ", "Tell me more, please. ", "Why? "]


def run_batcher(model, cache_mb: float, work):
    """work(batcher) on a fresh, started batcher with that prefix cache budget; returns (result, stats)."""
    b = Batcher(model, max_batch=4, chunk=CHUNK, prefix_cache_mb=cache_mb)
    b.start()
    try:
        return work(b), b.stats
    finally:
        b.close()


def test_a_conversation_reuses_its_cache_and_gives_the_same_tokens(model):
    plain, plain_stats = run_batcher(model, 0, lambda b: converse(model, b, TURNS))
    reused, stats = run_batcher(model, 1, lambda b: converse(model, b, TURNS))
    assert [r.job.ids for r in reused] == [r.job.ids for r in plain]
    assert "prefix_cache_hits" not in plain_stats
    assert stats["prefix_cache_hits"] == len(TURNS) - 1
    assert stats["prefix_cache_tokens_reused"] == sum(len(t.prompt_ids) + len(t.job.ids) for t in reused[:-1])


def test_an_evicted_conversation_is_prefilled_again(model):
    one_row = 2 * 2 * 64 * 64 * 4  # k and v, 2 layers, 64 positions x 64 wide, float32: one kept turn

    def work(b):
        first = converse(model, b, ["A long enough first message, alpha. "], max_tokens=8)[0]
        converse(model, b, ["Zebras: another conversation, quite different. "], max_tokens=8)  # evicts the first
        next_turn = first.prompt_ids + first.job.ids + model.tokenizer.encode("Go on. ")
        return converse(model, b, [next_turn], max_tokens=8)[0]

    again, stats = run_batcher(model, 1.5 * one_row / 2**20, work)
    assert stats["prefix_cache_evictions"] >= 1 and stats["prefix_cache_hits"] == 0
    plain, _ = run_batcher(model, 0, lambda b: converse(model, b, [again.prompt_ids], max_tokens=8)[0])
    assert again.job.ids == plain.job.ids
