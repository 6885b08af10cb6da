"""Sliding-window perplexity: stride = window is the chunked loss; smaller strides stay inside the window."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.model import GPT, init_params
from jaxgpt.perplexity import _window_nll, perplexity, sliding_windows

CFG = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
IDS = np.random.default_rng(0).integers(0, 64, 150).tolist()


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


_forward = jax.jit(lambda p, x: GPT(CFG).apply({"params": p}, x)[0])


def nll_direct(params, context, target):
    """-log p(target | context) from one unpadded forward pass over exactly `context`."""
    logits = np.asarray(_forward(params, np.asarray([context], np.int32))[0, -1], np.float64)
    return float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target])


@pytest.mark.parametrize("n,window,stride", [(150, 32, 32), (150, 32, 8), (100, 32, 31), (40, 32, 1), (10, 32, 4)])
def test_every_token_scored_once_inside_the_window(n, window, stride):
    counts = np.zeros(n, int)
    for w in sliding_windows(n, window, stride):
        assert 0 <= w.begin < w.first_scored <= w.end <= n and w.end - w.begin <= window
        counts[w.first_scored:w.end] += 1
    if stride < window:
        assert counts[0] == 0 and (counts[1:] == 1).all()
    else:  # non-overlapping chunks: a chunk's first token has no context inside it
        assert (counts[::window] == 0).all() and counts.sum() == n - len(range(0, n, window))


def test_stride_equal_to_window_is_the_chunked_loss(params):
    r = perplexity(params, CFG, IDS, stride=32)
    chunks = [IDS[i:i + 32] for i in range(0, len(IDS), 32)]
    losses = []
    for c in chunks:
        padded = np.zeros((1, 32), np.int32)
        padded[0, :len(c)] = c
        losses += np.asarray(_window_nll(CFG)(params, padded, np.int32(64)))[0, 1:len(c)].tolist()
    assert r.n_scored == len(losses) == 150 - 5
    np.testing.assert_allclose(r.nll, np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(r.perplexity, np.exp(np.mean(losses)), rtol=1e-5)


def test_smaller_stride_uses_at_most_the_window(params):
    r = perplexity(params, CFG, IDS, stride=8)
    scored = np.flatnonzero(~np.isnan(r.nll_N))
    assert scored.tolist() == list(range(1, 150))
    ctx = r.context_N[scored]
    assert ctx.max() <= 31 and (ctx >= np.minimum(scored, 32 - 8)).all()
    for t in (1, 20, 31, 32, 77, 149):  # each equals a forward pass over exactly its window's context
        c = r.context_N[t]
        np.testing.assert_allclose(r.nll_N[t], nll_direct(params, IDS[t - c:t], IDS[t]), rtol=1e-4, atol=1e-5)
    # Smaller strides give more context on average, so (for a model that uses context) a different number.
    assert r.n_scored == 149
    with pytest.raises(JaxgptError, match="stride"):
        perplexity(params, CFG, IDS, stride=64)


def test_cli_perplexity_chat_and_streaming_generate(tmp_path, tiny_overrides):
    def jaxgpt(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "jaxgpt.cli", *args], capture_output=True, text=True,
                              timeout=300, input=stdin)

    overrides = {**tiny_overrides, "train.steps": 4, "train.eval_every": 4, "train.save_every": 4,
                 "model.block_size": 64}
    run = str(tmp_path / "run")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  preset: tiny\n")
    out = jaxgpt("train", "--config", str(cfg), "--run-dir", run,
                 *[f"{k}={v}" for k, v in overrides.items() if k != "model.preset"])
    assert out.returncode == 0, out.stderr
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    ppl = jaxgpt("perplexity", "--run-dir", run, "--file", str(text), "--stride", "16")
    assert ppl.returncode == 0, ppl.stderr
    assert ppl.stdout.startswith("perplexity ") and '"n_scored": 179' in ppl.stdout
    gen = jaxgpt("generate", "--run-dir", run, "--prompt", "The ", "--max-new-tokens", "12", "--stream",
                 "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2", "--min-new-tokens", "3")
    assert gen.returncode == 0 and gen.stdout.startswith("The "), gen.stderr
    chat = jaxgpt("chat", "--run-dir", run, "--max-new-tokens", "8", stdin="hi\nyo\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 2
    bad = jaxgpt("generate", "--run-dir", run, "--repetition-penalty", "-1")
    assert bad.returncode == 2 and "repetition-penalty" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
