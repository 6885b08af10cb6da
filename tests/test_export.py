"""Exported artifacts: same tokens and log-probabilities as the live model, int8 too, and no model code
needed to run them; artifacts without scoring programs still generate."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgpt import config
from jaxgpt.api import LanguageModel
from jaxgpt.data import tokenizers
from jaxgpt.errors import JaxgptError
from jaxgpt.export import export_model
from jaxgpt.exported import load_exported
from jaxgpt.model import init_params
from jaxgpt.quantize import quantize_params
from jaxgpt.scoring import token_logprobs

PROMPTS = ["hello wor", "abc", "the quick brown fox"]


@pytest.fixture(scope="module")
def live():
    cfg = config.load(None, {"model.preset": "tiny", "model.vocab_size": 64})
    tok = tokenizers.CharTokenizer(list("abcdefghijklmnopqrstuvwxyz ,.:\n"))
    params = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, init_params(cfg.model, jax.random.key(0)))
    return LanguageModel(cfg, params, tok, 7)


@pytest.fixture(scope="module")
def exported(live, tmp_path_factory):
    return export_model(live, tmp_path_factory.mktemp("exp") / "m", prompt_buckets=(16, 32), max_new_tokens=24)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, top_k=5, seed=3),
                                dict(temperature=0.7, top_p=0.8, repetition_penalty=1.3, seed=[1, 2, 3])])
def test_exported_equals_live(live, exported, kw):
    em = load_exported(exported)
    assert em.generate(PROMPTS, 20, **kw) == live.generate(PROMPTS, 20, **kw)
    one = {**kw, "seed": 5} if "seed" in kw else kw
    assert em.generate(PROMPTS[0], 5, **one) == live.generate(PROMPTS[0], 5, **one)


def _assert_same_logprobs(exported_model, live_model, rows, top_n):
    got = exported_model.token_logprobs(rows, top_n=top_n, batch_size=2)
    want = token_logprobs(live_model.params, live_model.cfg.model, rows, n_vocab=live_model.tokenizer.vocab_size,
                          top_n=top_n)
    for g, w, row in zip(got, want, rows):
        assert g.logprob_T.dtype == np.float32 and len(g.logprob_T) == len(row) and g.top_ids_TxK.shape[1] == top_n
        np.testing.assert_allclose(g.logprob_T, w.logprob_T, atol=1e-5)
        np.testing.assert_allclose(g.top_logprob_TxK, w.top_logprob_TxK, atol=1e-5)
        np.testing.assert_array_equal(g.top_ids_TxK[1:], w.top_ids_TxK[1:])
        np.testing.assert_array_equal(g.greedy_T, w.greedy_T)


def test_exported_logprobs_and_scores_equal_live(live, exported):
    em = load_exported(exported)
    tok = live.tokenizer
    # Lengths in every scoring bucket (16, 32, 64 = the whole context), more rows than one batch.
    rows = [tok.encode(p) for p in PROMPTS] + [tok.encode("abcdefghijklmnopqrstuvwxyz" * 3)[:64], [tok.eos_id]]
    _assert_same_logprobs(em, live, rows, top_n=5)
    contexts, continuations = ["hello", "", "the quick"], [" world", "abc", " brown fox"]
    for g, w in zip(em.score(contexts, continuations), live.score(contexts, continuations)):
        assert abs(g.logprob - w.logprob) < 1e-5 and g.greedy == w.greedy
    assert em.score("hello", " world") == em.score(["hello"], [" world"])[0]
    with pytest.raises(JaxgptError, match="top_n must be in"):
        em.token_logprobs(rows, top_n=21)
    with pytest.raises(JaxgptError, match="longer than the model's context"):
        em.score("a" * 60, "b" * 10)


def test_int8_export_equals_live_int8(live, tmp_path):
    out = export_model(live, tmp_path / "q", prompt_buckets=(16,), max_new_tokens=16, quantize="int8")
    quantized = LanguageModel(live.cfg, quantize_params(live.params), live.tokenizer)
    assert load_exported(out).generate(PROMPTS[:2], 12, temperature=0.0) == quantized.generate(
        PROMPTS[:2], 12, temperature=0.0)
    _assert_same_logprobs(load_exported(out), quantized, [live.tokenizer.encode(p) for p in PROMPTS], top_n=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantize"] == "int8" and any(k.endswith("/int8") for k in manifest["weights"])


def test_stream_ids_in_chunks_equals_generate_ids(exported):
    em = load_exported(exported)
    ids = [em.tokenizer.encode(p) for p in PROMPTS]
    pieces = list(em.stream_ids(ids, 12, temperature=0.0, chunk=5))
    assert [len(max(p, key=len)) for p in pieces][:2] == [5, 5]
    assert [sum(rows, []) for rows in zip(*pieces)] == em.generate_ids(ids, 12, temperature=0.0)


def test_fixed_batch_sizes_where_a_symbolic_batch_does_not_export(live, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("no symbolic shapes here")

    monkeypatch.setattr(jax.export, "symbolic_shape", refuse)
    out = export_model(live, tmp_path / "fixed", batch_sizes=(1, 2), prompt_buckets=(16,), max_new_tokens=8)
    em = load_exported(out)
    assert em.batch_sizes == [1, 2] and sorted({b for _, b in em.score_programs}) == [1, 2]
    rows = [live.tokenizer.encode(p) for p in PROMPTS]  # 3 rows: batches of 2 and 1
    _assert_same_logprobs(em, live, rows, top_n=2)
    assert em.generate(PROMPTS[:2], 6, temperature=0.0) == live.generate(PROMPTS[:2], 6, temperature=0.0)


def test_an_export_without_scoring_programs_generates_and_asks_for_a_re_export(exported, tmp_path):
    old = shutil.copytree(exported, tmp_path / "format1")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("score_top")
    for p in manifest.pop("score_programs"):  # what `jaxgpt export` wrote before format 2
        (old / p["file"]).unlink()
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    em = load_exported(old)
    assert not em.can_score and em.generate("abc", 6, temperature=0.0) == load_exported(exported).generate(
        "abc", 6, temperature=0.0)
    with pytest.raises(JaxgptError, match="no scoring program.*re-export it with `jaxgpt export`"):
        em.score("abc", "d")


def test_runs_without_flax_or_model_code(exported):
    code = (f"import sys, jaxgpt; m = jaxgpt.load_exported({str(exported)!r}); "
            "out = m.generate('abc', 8, temperature=0.0); out += repr(m.score('ab', 'c')); "
            "assert 'flax' not in sys.modules and 'jaxgpt.model' not in sys.modules, sorted(sys.modules); "
            "print(repr(out))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_limits_are_clear_errors(exported):
    em = load_exported(exported)
    with pytest.raises(JaxgptError, match="max_new_tokens up to 24.*slide=True"):
        em.generate("abc", 100, slide=False)
    with pytest.raises(JaxgptError, match="prompts of up to 32 tokens.*--prompt-buckets"):
        em.generate("a" * 40, 4, slide=False)
    assert len(em.generate("abc", 100, min_new_tokens=100, temperature=0.0)) == 100  # slides by default
    with pytest.raises(JaxgptError, match="max_new_tokens must be positive"):
        em.generate("abc", 0)
    with pytest.raises(JaxgptError, match="chunk must be positive"):
        next(em.stream_ids([[1]], 4, chunk=0))
    with pytest.raises(JaxgptError, match="not an exported jaxgpt model"):
        load_exported(exported.parent)
    np.testing.assert_equal(len(em.generate(["a", "b"], 3, temperature=0.0)), 2)


def test_an_export_from_a_newer_format_is_refused(exported, tmp_path):
    newer = shutil.copytree(exported, tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format": manifest["format"] + 1}))
    with pytest.raises(JaxgptError, match="exported by a newer jaxgpt"):
        load_exported(newer)
