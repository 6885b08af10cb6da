"""DPO: the loss against a hand computation, JSONL errors with line numbers, and the CLI end to end."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

import jaxgpt
from jaxgpt import config as config_lib
from jaxgpt.config import ModelConfig
from jaxgpt.data.tokenizers import CharTokenizer
from jaxgpt.errors import JaxgptError
from jaxgpt.model import GPT, init_params
from jaxgpt.rl import dpo

TOK = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz .,?!"])
CFG = ModelConfig(preset="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)


_apply = jax.jit(lambda params, tokens: GPT(CFG).apply({"params": params}, tokens)[0])


def _np_logprobs(params, tokens_BxL: np.ndarray) -> np.ndarray:
    """Bx(L-1)xV next-token log-probs in float64, padded vocabulary entries excluded."""
    logits = np.asarray(_apply(params, tokens_BxL[:, :-1]), np.float64)[..., :TOK.vocab_size]
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


def test_dpo_loss_matches_hand_computation():
    pairs = [dpo.Pair("to be", " or not", " maybe", "x"), dpo.Pair("", "yes.", "no, never", "y")]
    encoded = dpo.encode_pairs(TOK, pairs, CFG.block_size)
    batch = dpo.pair_batch(encoded, TOK.eos_id, CFG.block_size)
    ref = init_params(CFG, jax.random.key(0))
    pol = jax.tree.map(lambda x: x * 1.1, ref)
    beta = 0.3
    loss_fn = jax.jit(lambda p, r, b: dpo.dpo_loss(CFG, beta, TOK.vocab_size, p, r, b))
    loss, metrics = loss_fn(pol, ref, batch)

    # Per-token log-probs of every row in float64, then sums over each response (and its closing eos) by hand.
    lp_pol, lp_ref = _np_logprobs(pol, batch["tokens_BxL"]), _np_logprobs(ref, batch["tokens_BxL"])
    rows = [c for c, _ in encoded] + [r for _, r in encoded]
    seq = [sum(lp_pol[b, t - 1, ids[t]] - lp_ref[b, t - 1, ids[t]] for t in range(start, len(ids)))
           for b, (ids, start) in enumerate(rows)]
    assert all(ids[-1] == TOK.eos_id for ids, _ in rows)
    K = len(pairs)
    margins = [beta * (seq[k] - seq[K + k]) for k in range(K)]
    want = np.mean([-math.log(1 / (1 + math.exp(-m))) for m in margins])
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert float(metrics["reward_margin"]) == pytest.approx(np.mean(margins), rel=1e-3, abs=1e-5)
    # At the reference every margin is 0 and the loss is log 2.
    assert float(loss_fn(ref, ref, batch)[0]) == pytest.approx(math.log(2), rel=1e-6)


def test_encode_row_keeps_the_response_and_the_end_of_the_prompt():
    ids, start = dpo.encode_row(TOK, "abcdefghij", "xyz", 8)
    assert TOK.decode(ids[:start]) == "ghij" and ids[start:] == TOK.encode("xyz") + [TOK.eos_id]
    ids, start = dpo.encode_row(TOK, "", "abc", 8)
    assert start == 1 and ids[0] == TOK.eos_id  # an empty prompt starts from end-of-text


@pytest.mark.parametrize("text,match", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"', r"line 2: not valid JSON"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b"}',
     r"line 3: missing field 'rejected'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', r"line 1: field 'chosen' must be a string, got int"),
    ('["a", "b", "c"]', r"line 1: expected a JSON object"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', r"line 1: 'chosen' and 'rejected' must not be empty"),
    ("\n\n", r"holds no preference pairs"),
])
def test_bad_jsonl_is_a_one_line_error_with_the_line_number(tmp_path, text, match):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(JaxgptError, match=match) as e:
        dpo.read_pairs(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value) or "no preference" in str(e.value)


def test_unencodable_text_names_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good, bad = '{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "Ж", "rejected": "c"}'
    path.write_text(f"{good}\n{bad}\n")
    with pytest.raises(JaxgptError, match="line 2"):
        dpo.encode_pairs(TOK, dpo.read_pairs(path), 32)


def test_dpo_cli_end_to_end(corpus_dir, tmp_path, capsys):
    from jaxgpt.cli import main
    from jaxgpt.train import train

    cfg = config_lib.load(None, {
        "model.preset": "tiny", "model.block_size": 32, "data.source": f"file:{corpus_dir}/*.txt",
        "data.tokenizer": "char", "data.cache_dir": str(tmp_path / "cache"), "train.steps": 3, "train.batch_size": 8,
        "train.warmup_steps": 1, "train.eval_every": 3, "train.eval_batches": 1, "train.save_every": 3,
        "train.progress": False})
    train(cfg, tmp_path / "pre")
    words = ["the value", "a class", "an object", "the method", "a name", "the list"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Use {w}", "chosen": " of the type.", "rejected": " is it"}) + "\n"
                             for w in words * 2))
    run_dir = tmp_path / "dpo"
    assert main(["dpo", "--config", "configs/dpo.yaml", "--init-from", str(tmp_path / "pre"), "--run-dir",
                 str(run_dir), "--data", str(pairs), "train.steps=4", "train.batch_size=4", "train.eval_every=2",
                 "train.save_every=2", "train.log_every=1", "train.lr=3e-3"]) == 0
    records = [json.loads(ln) for ln in (run_dir / "rl_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["val_loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference
    assert records[-1]["loss"] < math.log(2) and records[-1]["reward_margin"] > 0
    assert jaxgpt.load(run_dir, "latest").step == 4
    assert main(["dpo", "--init-from", str(tmp_path / "pre"), "--run-dir", str(tmp_path / "x")]) == 2
    assert "--data" in capsys.readouterr().err
