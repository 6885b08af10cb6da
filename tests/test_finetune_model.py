"""LoRA, the SFT loss mask, and freezing / gradual unfreezing through the jitted finetune_step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import FinetuneConfig, ModelConfig, TrainConfig
from jaxgpt.data.tokenizers import CharTokenizer
from jaxgpt.finetune import batches as batch_lib
from jaxgpt.finetune import optim
from jaxgpt.finetune.data import Example
from jaxgpt.finetune.heads import init_head, task_loss
from jaxgpt.finetune.step import init_state, make_finetune_step
from jaxgpt.model import GPT, init_params, merge_lora

CFG = ModelConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=16)
LORA = dataclasses.replace(CFG, lora_rank=4, lora_alpha=8.0, lora_targets="c_attn,c_proj,c_fc")


def tokens(B=2, T=12):
    return jax.random.randint(jax.random.key(3), (B, T), 0, CFG.vocab_size)


def _overlay(tree, base):
    return {k: (_overlay(v, base[k]) if isinstance(v, dict) else base[k]) if k in base else v for k, v in tree.items()}


def test_lora_with_zero_b_is_exactly_the_base_model():
    base = init_params(CFG, jax.random.key(0))
    lora = init_params(LORA, jax.random.key(0))
    assert set(lora["h_0"]["attn"]["c_attn"]) == {"kernel", "bias", "lora_A", "lora_B"}
    assert set(lora["h_0"]["mlp"]["c_proj"]) >= {"lora_A", "lora_B"}
    assert not np.any(lora["h_0"]["attn"]["c_attn"]["lora_B"]) and np.any(lora["h_0"]["attn"]["c_attn"]["lora_A"])
    with_base = _overlay(lora, base)  # the same base weights, plus adapters with B = 0
    x = tokens()
    out_base, _ = GPT(CFG).apply({"params": base}, x)
    out_lora, _ = GPT(LORA).apply({"params": with_base}, x)
    np.testing.assert_array_equal(np.asarray(out_base), np.asarray(out_lora))


def test_merged_lora_equals_unmerged():
    params = init_params(LORA, jax.random.key(0))
    # Non-zero B so the adapters matter.
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: 0.05 * jax.random.normal(jax.random.key(len(p)), a.shape) if p[-1].key == "lora_B" else a, params)
    x = tokens()
    unmerged, _ = GPT(LORA).apply({"params": params}, x)
    merged, _ = GPT(CFG).apply({"params": merge_lora(params, LORA)}, x)
    base, _ = GPT(CFG).apply({"params": merge_lora(jax.tree.map(jnp.zeros_like, params), LORA)}, x)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5, rtol=1e-5)
    assert not np.allclose(np.asarray(merged), np.asarray(base))


def test_only_response_tokens_carry_sft_loss():
    # Lower case, and the template's headers: SYSTEM:, USER:, ASSISTANT:
    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyzSYTEMURAIN: \n?!.")))
    ex = Example("x", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi?"},
                                {"role": "assistant", "content": "ok."}, {"role": "user", "content": "and?"},
                                {"role": "assistant", "content": "done"}])
    enc = batch_lib.encode([ex], "sft", tok, 128, [])
    batch = batch_lib.make_batch(enc, np.arange(1), 2, 128, tok.eos_id)
    picked = [t for t, m in zip(batch["targets"][0], batch["mask"][0]) if m]
    assert tok.decode(picked) == "ok.done" and picked.count(tok.eos_id) == 2  # each reply ends with end-of-text
    assert batch["mask"][1].sum() == 0  # the filler row carries nothing
    cfg = dataclasses.replace(CFG, vocab_size=64, block_size=128)
    params = {"gpt": init_params(cfg, jax.random.key(0))}
    loss = lambda b: float(task_loss(cfg, "sft", "last", jnp.ones(1), params, b))  # noqa: E731
    base = loss(batch)
    prompt_changed = {**batch, "targets": np.where(batch["mask"] > 0, batch["targets"], 5)}
    assert loss(prompt_changed) == base  # targets outside assistant turns do not matter
    reply_changed = {**batch, "targets": np.where(batch["mask"] > 0, 7, batch["targets"])}
    assert loss(reply_changed) != base


def test_sft_loss_is_the_lm_loss_chunked_or_not():
    # task_loss for SFT (pretraining's fused weighted loss, chunked or not) against optax over full logits.
    cfg = dataclasses.replace(CFG, vocab_size=64, block_size=16)
    params = {"gpt": init_params(cfg, jax.random.key(0))}
    rs = np.random.default_rng(0)
    batch = {"tokens": rs.integers(0, 64, (3, 13)).astype(np.int32), "start": np.array([0, 4, 12], np.int32),
             "targets": rs.integers(0, 64, (3, 13)).astype(np.int32), "weight": np.array([1, 1, 0], np.float32),
             "mask": (rs.random((3, 13)) < 0.6).astype(np.float32)}

    def reference(p):
        logits_BxTxV, _ = GPT(cfg).apply({"params": p["gpt"]}, batch["tokens"], start_B=batch["start"])
        ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
        mask_BxT = batch["mask"] * batch["weight"][:, None]
        return (ce_BxT * mask_BxT).sum() / mask_BxT.sum()

    want, want_grads = jax.value_and_grad(reference)(params)
    for chunk in (0, 5):
        got, grads = jax.value_and_grad(lambda p: task_loss(cfg, "sft", "last", jnp.ones(1), p, batch,
                                                            loss_chunk=chunk))(params)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _run_steps(ft: FinetuneConfig, model_cfg=CFG, n_steps=7):
    params = {"gpt": init_params(model_cfg, jax.random.key(0)), "head": init_head(jax.random.key(1), model_cfg.n_embd, 2)}
    trainable = optim.trainable_tree(params, model_cfg, ft)
    tc = TrainConfig(steps=100, lr=1e-2, warmup_steps=0, weight_decay=0.1)
    tx, sched = optim.make_optimizer(tc, model_cfg, ft, params, trainable)
    step = jax.jit(make_finetune_step(model_cfg, "classify", "last", np.ones(2), tx, sched, trainable))
    state = init_state(params, tx, None)
    rng = np.random.default_rng(0)
    history = [jax.device_get(state["params"])]
    for _ in range(n_steps):
        batch = {"tokens": rng.integers(0, 64, (4, 8)).astype(np.int32), "start": np.zeros(4, np.int32),
                 "weight": np.ones(4, np.float32), "label": rng.integers(0, 2, 4).astype(np.int32)}
        state, _ = step(state, batch, jax.random.key(0), np.float32(1.0))
        history.append(jax.device_get(state["params"]))
    return history, trainable


def _changed(a, b, *keys):
    for k in keys:
        a, b = a[k], b[k]
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_frozen_params_stay_and_unfreezing_follows_the_schedule():
    # 3 blocks, one per stage every 2 steps: head from step 0, h_2 from 2, h_1 from 4, h_0 from 6, embeddings 8.
    history, _ = _run_steps(FinetuneConfig(unfreeze_every=2, unfreeze_blocks=1, freeze="attn"))
    def moved(step, *keys):  # did step `step` (1-based) change these params?
        return _changed(history[step - 1], history[step], *keys)
    assert moved(1, "head") and not moved(1, "gpt", "h_2") and not moved(1, "gpt", "wte")
    assert not moved(2, "gpt", "h_2", "mlp")
    assert moved(3, "gpt", "h_2", "mlp") and moved(3, "gpt", "ln_f") and not moved(3, "gpt", "h_1")
    assert moved(5, "gpt", "h_1", "mlp") and not moved(5, "gpt", "h_0")
    assert moved(7, "gpt", "h_0", "mlp") and not moved(7, "gpt", "wte")
    for i in range(3):  # frozen by group, at every step
        assert not _changed(history[0], history[-1], "gpt", f"h_{i}", "attn")


def test_lora_trains_only_adapters_and_head():
    history, trainable = _run_steps(FinetuneConfig(), LORA, n_steps=2)
    n_train, n_total = optim.count(history[0], trainable)
    assert 0 < n_train < n_total
    flat_before = jax.tree_util.tree_flatten_with_path(history[0])[0]
    flat_after = jax.tree.leaves(history[-1])
    for (path, before), after in zip(flat_before, flat_after):
        keys = [getattr(k, "key", k) for k in path]
        if keys[0] == "gpt" and keys[-1] not in ("lora_A", "lora_B"):
            np.testing.assert_array_equal(before, after)
    assert _changed(history[0], history[-1], "gpt", "h_0", "attn", "c_attn") and _changed(history[0], history[-1], "head")


def test_unknown_freeze_group_is_an_error():
    from jaxgpt.errors import JaxgptError

    with pytest.raises(JaxgptError, match="matches no parameter"):
        _run_steps(FinetuneConfig(freeze="encoder"), n_steps=0)
