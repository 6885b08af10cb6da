"""GRPO: advantages, clipped ratios, the KL term, zero gradient for a constant reward, rewards, and the CLI."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt
from jaxgpt.config import ModelConfig, RLConfig, TrainConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.model import init_params
from jaxgpt.rl import grpo, policy, rewards
from jaxgpt.train.optimizer import make_optimizer

CFG = ModelConfig(preset="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)
N_VOCAB, EOS, P, N, G = 60, 0, 8, 6, 4


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def _batch(adv_B: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
    """Left-padded prompts plus completions; one row ends early with eos, one prompt has 3 padding slots."""
    rng = np.random.default_rng(seed)
    B = len(adv_B)
    tokens_BxL = rng.integers(1, N_VOCAB, (B, P + N)).astype(np.int32)
    start_B = np.zeros(B, np.int32)
    start_B[1] = 3
    tokens_BxL[1, :3] = -1
    tokens_BxL[0, P + 2] = EOS
    tokens_BxL[0, P + 3:] = EOS
    return {"tokens_BxL": tokens_BxL, "start_B": start_B, "mask_BxN": policy.completion_mask(tokens_BxL[:, P:], EOS),
            "adv_B": adv_B.astype(np.float32)}


@jax.jit
def _logp(params, tokens_BxL, start_B):
    return policy.completion_logprobs(CFG, params, tokens_BxL, start_B, N_VOCAB, P)


def _with_old_logp(params, batch):
    logp_BxNxV = _logp(params, batch["tokens_BxL"], batch["start_B"])
    return {**batch, "old_logp_BxN": np.asarray(policy.gather(logp_BxNxV, batch["tokens_BxL"][:, P:]))}


@functools.partial(jax.jit, static_argnums=3)
def _loss_and_grads(params, ref_params, batch, rl: RLConfig):
    ref_logp = _logp(ref_params, batch["tokens_BxL"], batch["start_B"])
    return jax.value_and_grad(lambda p: grpo.rl_loss(CFG, rl, N_VOCAB, P, p, ref_logp, batch), has_aux=True)(params)


def _perturbed(params, scale=0.05):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_group_advantages_match_hand_computation():
    rewards_NxG = np.array([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    adv = grpo.group_advantages(rewards_NxG, eps=1e-4)
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4)
    np.testing.assert_allclose(adv[0], [(r - mean) / (std + 1e-4) for r in (1, 2, 3, 6)], rtol=1e-6)
    assert np.all(adv[1] == 0.0)  # a constant group gives no signal


def test_completion_mask_stops_after_the_first_eos():
    completion_BxN = np.array([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, -1, -1, -1]])
    np.testing.assert_array_equal(policy.completion_mask(completion_BxN, EOS),
                                  [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_clipped_ratio():
    ratio = jnp.array([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    adv_B = jnp.array([1.0, -1.0])
    old = jnp.zeros_like(ratio)

    def loss(logp):
        return grpo.clipped_surrogate(logp, old, adv_B, 0.2)[0]

    loss_BxN, _, clipped_BxN = grpo.clipped_surrogate(jnp.log(ratio), old, adv_B, 0.2)
    np.testing.assert_allclose(loss_BxN, [[-0.5, -1.0, -1.2], [0.8, 1.0, 1.5]], rtol=1e-6)
    np.testing.assert_array_equal(clipped_BxN, [[False, False, True], [True, False, False]])
    # Where the clip bound is active the token contributes no gradient; elsewhere d/dlogp = -A * ratio.
    grads = jax.grad(lambda lp: loss(lp).sum())(jnp.log(ratio))
    np.testing.assert_allclose(grads, [[-0.5, -1.0, 0.0], [0.0, 1.0, 1.5]], rtol=1e-6)


def test_constant_reward_gives_zero_policy_gradient(params):
    adv_B = grpo.group_advantages(np.full((2, G), 0.7), 1e-4).reshape(-1)
    policy_params = _perturbed(params)
    batch = _with_old_logp(policy_params, _batch(adv_B))
    (loss, metrics), grads = _loss_and_grads(policy_params, params, batch, RLConfig(kl_coef=0.0))
    assert float(loss) == 0.0
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads))
    # With a KL penalty only the KL term pushes (towards the reference).
    (_, metrics), grads = _loss_and_grads(policy_params, params, batch, RLConfig(kl_coef=0.1))
    assert float(metrics["pg_loss"]) == 0.0 and float(metrics["kl"]) > 0
    assert float(jax.tree.reduce(lambda a, g: a + jnp.sum(g * g), grads, 0.0)) > 0


@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_kl_is_zero_with_zero_gradient_at_the_reference(params, estimator):
    rl = RLConfig(kl_coef=1.0, kl_estimator=estimator)
    batch = _with_old_logp(params, _batch(np.zeros(2 * G)))
    (_, metrics), grads = _loss_and_grads(params, params, batch, rl)
    assert abs(float(metrics["kl"])) < 1e-6
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
    (_, metrics), _ = _loss_and_grads(_perturbed(params), params, batch, rl)
    assert float(metrics["kl"]) > 1e-4


def test_exact_kl_matches_numpy(params):
    other = _perturbed(params)
    batch = _batch(np.zeros(2 * G))
    p, q = (np.asarray(_logp(prm, batch["tokens_BxL"], batch["start_B"]), np.float64) for prm in (other, params))
    want = (np.exp(p) * (p - q))[..., :N_VOCAB].sum(-1)  # padded vocabulary entries carry no mass
    got = grpo.token_kl(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), batch["tokens_BxL"][:, P:], "exact")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_jitted_rl_step_leaves_params_unchanged_for_a_constant_reward(params):
    rl = RLConfig(kl_coef=0.0, ppo_epochs=2, minibatches=2)
    tx = make_optimizer(TrainConfig(weight_decay=0.0, warmup_steps=0, steps=10))
    step = jax.jit(grpo.make_rl_step(CFG, rl, tx, N_VOCAB, P))
    batch = _with_old_logp(params, _batch(np.zeros(2 * G)))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    new_state, metrics = step(state, params, batch, jax.random.key(0))
    assert int(new_state["step"]) == 1 and float(metrics["grad_norm"]) == 0.0
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params)))
    # A real advantage moves the params, and the first minibatch's ratio is exactly 1 (nothing updated yet).
    batch["adv_B"] = np.tile([1.0, -1.0], G).astype(np.float32)
    new_state, metrics = step(state, params, batch, jax.random.key(0))
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params)))
    assert np.isfinite(float(metrics["loss"]))


def test_syllable_counter_on_hand_made_lines():
    assert [rewards.count_syllables(w) for w in ("light", "yonder", "window", "compare", "table", "loved", "wanted",
                                                 "question", "I")] == [1, 2, 2, 2, 2, 1, 2, 2, 1]
    assert rewards.line_syllables("But soft, what light through yonder window breaks?") == 10
    assert rewards.line_syllables("Shall I compare thee to a summer's day?") == 10
    assert rewards.line_syllables("To be, or not to be, that is the question") == 11
    completion = ("But soft, what light through yonder window breaks?\nROMEO:\n\n"
                  "To be, or not to be, that is the question\nand a partial li")
    # Ten syllables score 1, eleven 0.9; the speaker heading, the blank and the unfinished line are skipped.
    assert rewards.syllables_reward(10)([""], [completion]) == [pytest.approx(0.95)]
    assert rewards.syllables_reward(10)([""], ["no complete line"]) == [0.0]
    assert rewards.syllables_reward(10)([""], ["Go.\n"]) == [pytest.approx(0.1)]


def test_target_word_and_rhyme_rewards():
    assert rewards.target_word_reward("love")(["", ""], ["My Love is here", "lovely day"]) == [1.0, 0.0]
    rhyme = rewards.rhyme_reward()
    text = "I walk alone beneath the night\nand wait until the morning light\nthen fly away\n"
    assert rhyme([""], [text]) == [pytest.approx(0.5)]  # night/light rhyme, light/away do not
    assert rhyme([""], ["the night\nthe night\n"]) == [0.0]  # a word does not rhyme with itself


class _FakeClassifier:
    labels = ["comedies", "histories", "tragedies"]

    def classify(self, texts, batch_size=16):
        probs = np.array([[0.7, 0.2, 0.1] if "jest" in t else [0.1, 0.1, 0.8] for t in texts])
        return [self.labels[i] for i in probs.argmax(1)], probs


def test_classifier_reward_uses_the_label_probability():
    reward = rewards.ClassifierReward(_FakeClassifier(), "comedies")
    assert reward(["p", "p"], ["a merry jest", "a bloody deed"]) == [pytest.approx(0.7), pytest.approx(0.1)]
    with pytest.raises(JaxgptError, match="not one of the classifier's labels"):
        rewards.ClassifierReward(_FakeClassifier(), "romances")
    with pytest.raises(JaxgptError, match="not a classifier"):
        rewards.ClassifierReward(object(), "comedies")


def test_reward_callable_from_module_and_checks(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text("def length(prompts, completions):\n"
                                           "    return [len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.make_reward(RLConfig(reward="my_reward:length"))
    assert rewards.score(fn, ["a", "b"], ["xy", ""]) == [2.0, 0.0]
    with pytest.raises(JaxgptError, match="returned 1 scores for 2"):
        rewards.score(lambda p, c: [1.0], ["a", "b"], ["x", "y"])
    with pytest.raises(JaxgptError, match="cannot import"):
        rewards.make_reward(RLConfig(reward="my_reward:missing"))
    with pytest.raises(JaxgptError, match="unknown rl.reward 'syllable'"):
        rewards.make_reward(RLConfig(reward="syllable"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, train_tiny):
    """A tiny char-level model trained for a few steps on the test corpus (in ROOT/pre)."""
    root = tmp_path_factory.mktemp("rl")
    train_tiny(root / "pre", {"train.steps": 5, "train.batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 1,
                              "train.eval_every": 5, "train.save_every": 5, "train.log_every": 5})
    return root


def test_rl_cli_end_to_end(pretrained, capsys):
    from jaxgpt.cli import main

    prompts = pretrained / "prompts.txt"
    prompts.write_text("\n".join(["The object", "A function", "The value of", "If the", "When a class",
                                  "The result"]) + "\n")
    run_dir = pretrained / "rl"
    args = ["rl", "--init-from", str(pretrained / "pre"), "--run-dir", str(run_dir), f"rl.prompts={prompts}",
            "rl.reward=target_word", "rl.target_word=the", "rl.prompts_per_step=2", "rl.group_size=4",
            "rl.max_new_tokens=8", "rl.eval_prompts=2", "rl.eval_samples=4", "rl.ppo_epochs=2", "train.steps=3",
            "train.eval_every=2", "train.save_every=2", "train.log_every=1", "train.progress=false",
            "train.lr=1e-3"]
    assert main(args) == 0
    records = [json.loads(ln) for ln in (run_dir / "rl_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert set(json.loads((run_dir / "config.json").read_text())) == {"model", "data", "train", "mesh", "seed", "rl"}
    assert {"eval_reward", "eval_kl"} <= set(records[0]) and records[0]["eval_kl"] == pytest.approx(0, abs=1e-6)
    assert {"reward", "kl", "loss", "clip_frac", "eval_reward"} <= set(records[-1])
    assert (run_dir / "rl_samples.jsonl").is_file()
    model = jaxgpt.load(run_dir, "latest")
    assert model.step == 3 and isinstance(model.generate("The", max_new_tokens=4), str)
    assert "done:" in capsys.readouterr().out
    # Running again with more steps resumes from the checkpoint.
    assert main([a if a != "train.steps=3" else "train.steps=4" for a in args]) == 0
    records = [json.loads(ln) for ln in (run_dir / "rl_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    # A bad key is a one-line error.
    assert main(args[:6] + ["rl.kl_coeff=0.1"]) == 2
    assert "did you mean 'rl.kl_coef'" in capsys.readouterr().err
