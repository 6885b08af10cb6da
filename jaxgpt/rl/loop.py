"""The RL loop (sample -> reward -> group advantages -> jitted rl_step) and the DPO loop.

An RL run dir holds config.json (the pretrained run's model/data/seed plus `train.*` and `rl.*`),
tokenizer/, checkpoints/ (Orbax, as pretraining; `jaxgpt.load(run_dir)` reads them), rl_metrics.jsonl,
rl_samples.jsonl (held-out samples at every evaluation) and rl_reward.png. Both run on jaxgpt.train.runner;
sampling keys and prompt choices are functions of (seed, step), so running the same command again resumes
where it stopped, with the same metrics as an uninterrupted run.

Checkpoints are ranked by the mean held-out reward (highest) for GRPO, so `jaxgpt.load(run_dir)` gives the
policy with the best held-out reward; for DPO by the held-out DPO loss (the training loss without held-out pairs).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import conversation, rundir, sharding
from jaxgpt.config import RLRunConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import left_pad, prompt_bucket
from jaxgpt.rl import dpo as dpo_lib
from jaxgpt.rl import grpo, plot, policy, rewards
from jaxgpt.rl.config import check
from jaxgpt.rl.prompts import load_prompts
from jaxgpt.train import runner
from jaxgpt.train.checkpoint import Checkpointer
from jaxgpt.train.metrics_log import MetricsLog

METRICS_FILE = "rl_metrics.jsonl"


class _Run(runner.Mode):
    """What both modes share: config, tokenizer, mesh, frozen reference, and running on the runner."""

    def selection(self) -> tuple[str, str]:
        """(metric, 'min' or 'max') the checkpoints are ranked by."""
        raise NotImplementedError

    def __init__(self, cfg: RLRunConfig, run_dir: str | Path, updates_per_step: int):
        from jaxgpt.api import load

        check(cfg)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        init = load(cfg.rl.init_from)  # a classifier run dir is refused there, in one line
        self.template = conversation.inherit(cfg.rl.init_from, self.run_dir)  # a chat model keeps its format
        cfg = rundir.resolve_config(self.run_dir, cfg)
        self.cfg, self.tok = cfg, init.tokenizer
        self.n_vocab = self.tok.vocab_size
        if jax.process_index() == 0:
            config_lib.save_json(cfg, rundir.config_path(self.run_dir))
            if not (self.run_dir / "tokenizer" / "tokenizer.json").is_file():
                self.tok.save(self.run_dir / "tokenizer")
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.ps = policy.policy_state(cfg.model, policy.updates_train_config(cfg.train, updates_per_step), self.mesh)
        with self.context():
            self.ref_params = self.ps.frozen_copy(init.params)  # before the state (donated each step) may alias it
        self.init_params = init.params

    def run(self) -> dict[str, Any]:
        tc = self.cfg.train
        with runner.lock(self.run_dir):
            ckpt = Checkpointer(self.run_dir, *self.selection())
            try:
                with self.context():
                    state = ckpt.restore_latest(self.ps.abstract)
                    state = self.ps.fresh(self.init_params) if state is None else state
                    start = int(state["step"])
                    if start >= tc.steps:
                        print(f"run dir already trained to step {start} (train.steps={tc.steps})")
                        return {"step": start}
                    self.begin(start)
                    return runner.run(self, state, start, runner.Cadence.of(tc), ckpt, self.run_dir, METRICS_FILE,
                                      tc.progress).summary
            finally:
                ckpt.close()
                if jax.process_index() == 0:
                    plot.plot_run(self.run_dir)

    def begin(self, start: int) -> None:
        """Before the first step of this run (or resume)."""

    def context(self) -> contextlib.ExitStack:
        """The mesh and logical-axis rules every jitted call runs under."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows (`self.rows` of `self.B`) -> the global batch on the mesh."""
        return sharding.global_batch(local, self.mesh, self.B)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


class GRPOLoop(_Run):
    def __init__(self, cfg: RLRunConfig, run_dir: str | Path):
        super().__init__(cfg, run_dir, cfg.rl.ppo_epochs * cfg.rl.minibatches)
        rl = self.cfg.rl
        self.reward_fn = rewards.make_reward(rl)
        train_texts, eval_texts = load_prompts(self.cfg)
        # (text the reward sees, ids); a dialogue prompt's text is its last user message.
        self.train_prompts = [(self._text(t), self._encode(t)) for t in train_texts]
        self.eval_prompts = [(self._text(t), self._encode(t)) for t in eval_texts]
        self.B = rl.prompts_per_step * rl.group_size
        self.rows = sharding.host_rows(self.mesh, self.B, "rl.prompts_per_step x rl.group_size")
        sharding.host_rows(self.mesh, self.B // rl.minibatches, "a minibatch")  # checks the split
        # One prompt width for every batch: one compilation of the sampler and the step.
        longest = max(len(ids) for _, ids in self.train_prompts + self.eval_prompts)
        self.P = min(prompt_bucket(longest), self.cfg.model.block_size - rl.max_new_tokens)
        P, cfg, nv = self.P, self.cfg.model, self.n_vocab
        self.old_logp = jax.jit(
            lambda p, t, s: policy.gather(policy.completion_logprobs(cfg, p, t, s, nv, P), t[:, P:]))
        self.kl_of = jax.jit(lambda p, r, t, s: grpo.token_kl(policy.completion_logprobs(cfg, p, t, s, nv, P),
                                                              policy.completion_logprobs(cfg, r, t, s, nv, P),
                                                              t[:, P:], "exact"))
        self.step_fn = self.ps.jit(grpo.make_rl_step(cfg, rl, self.ps.tx, nv, P), extra_args=1)
        self.samples_log: MetricsLog | None = None

    postfix = ("reward", "kl", "clip_frac")

    def selection(self) -> tuple[str, str]:
        return "eval_reward", "max"

    def begin(self, start: int) -> None:
        self.samples_log = MetricsLog(self.run_dir, start if start else -1, "rl_samples.jsonl", tensorboard=False)

    def first_record(self) -> dict[str, Any]:
        before = self.evaluate_params(self.ref_params, 0)  # the reference is the initial policy
        if jax.process_index() == 0:
            print(f"jaxgpt rl: held-out reward before {before['eval_reward']:.4f}; "
                  f"{len(self.train_prompts)} train prompts, {self.B} samples/step, prompt width {self.P}")
        return {"step": 0, **before, "eval_reward_before": before["eval_reward"]}

    @staticmethod
    def _text(prompt) -> str:
        return prompt[-1]["content"] if isinstance(prompt, list) else prompt

    def _encode(self, prompt) -> list[int]:
        """A text prompt's ids, or a dialogue's in the chat template (the ids SFT trained the reply after)."""
        try:
            ids = (conversation.prompt_ids(self.template, prompt, self.tok) if isinstance(prompt, list)
                   else self.tok.encode(prompt)) or [self.tok.eos_id]
        except JaxgptError as e:
            raise JaxgptError(f"prompt {self._text(prompt)[:40]!r}: {e}") from None
        return ids[-(self.cfg.model.block_size - self.cfg.rl.max_new_tokens):]  # long prompts keep their end

    def rollout(self, params, prompts: list[tuple[str, list[int]]], keys_B) -> dict[str, Any]:
        """Sample one completion per row; the decoded texts, rewards, token mask and stored log-probs."""
        rl, eos = self.cfg.rl, self.tok.eos_id
        tokens_BxP, start_B = left_pad([ids for _, ids in prompts], eos, self.P)
        seq_BxL = policy.sample(self.cfg.model, params, tokens_BxP, start_B, keys_B, rl.max_new_tokens, eos,
                                self.n_vocab, rl.temperature)
        completion_BxN = seq_BxL[:, self.P:]
        mask_BxN = policy.completion_mask(completion_BxN, eos)
        texts = [self.tok.decode([t for t, m in zip(row, keep) if m and t != eos])
                 for row, keep in zip(completion_BxN.tolist(), mask_BxN.tolist())]
        scores = rewards.score(self.reward_fn, [p for p, _ in prompts], texts)
        return {"tokens_BxL": seq_BxL, "start_B": start_B, "mask_BxN": mask_BxN, "texts": texts,
                "rewards_B": np.asarray(scores, np.float32)}

    def train_batch(self, params, step: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        rl = self.cfg.rl
        rng = np.random.default_rng([self.cfg.seed, step])
        n = len(self.train_prompts)
        chosen = rng.choice(n, rl.prompts_per_step, replace=n < rl.prompts_per_step)
        prompts = [self.train_prompts[i] for i in chosen for _ in range(rl.group_size)]
        ro = self.rollout(params, prompts, policy.row_keys(self.cfg.seed, step, self.B))
        adv_B = grpo.group_advantages(ro["rewards_B"].reshape(rl.prompts_per_step, rl.group_size), rl.adv_eps)
        batch = {"tokens_BxL": ro["tokens_BxL"], "start_B": ro["start_B"], "mask_BxN": ro["mask_BxN"],
                 "adv_B": adv_B.reshape(-1)}
        batch["old_logp_BxN"] = np.asarray(self.old_logp(params, batch["tokens_BxL"], batch["start_B"]))
        return batch, ro

    def evaluate(self, state, step: int) -> dict[str, float]:
        return self.evaluate_params(state["params"], step)

    def evaluate_params(self, params, step: int) -> dict[str, float]:
        """Mean reward and KL to the reference on the held-out prompts, with the same sampling keys every time."""
        rl = self.cfg.rl
        prompts = [p for p in self.eval_prompts for _ in range(rl.eval_samples)]
        ro = self.rollout(params, prompts, policy.row_keys(self.cfg.seed + 1, 0, len(prompts)))
        kl_BxN = np.asarray(self.kl_of(params, self.ref_params, ro["tokens_BxL"], ro["start_B"]))
        mask_BxN = ro["mask_BxN"]
        samples = [{"step": step, "prompt": p, "completion": t, "reward": float(r)}
                   for (p, _), t, r in list(zip(prompts, ro["texts"], ro["rewards_B"]))[::rl.eval_samples][:8]]
        for s in samples:
            self.samples_log.write(s)
        return {"eval_reward": float(ro["rewards_B"].mean()),
                "eval_kl": float((kl_BxN * mask_BxN).sum() / mask_BxN.sum()),  # per token
                "eval_kl_seq": float((kl_BxN * mask_BxN).sum(1).mean()),  # per completion
                "eval_len": float(mask_BxN.sum(1).mean())}

    def step(self, state, step: int):
        batch, ro = self.train_batch(state["params"], step)
        local = {k: v[self.rows] for k, v in batch.items()}  # every host sampled all rows; each feeds its own
        state, metrics = self.step_fn(state, self.ref_params, self.global_batch(local), jax.random.key(self.cfg.seed))
        return state, {"reward": float(ro["rewards_B"].mean()), "reward_std": float(ro["rewards_B"].std()),
                       **_floats(metrics), "completion_len": float(batch["mask_BxN"].sum(1).mean())}

    def speed(self, seconds_per_step: float) -> dict[str, float]:
        return {"sec": seconds_per_step}


class DPOLoop(_Run):
    def __init__(self, cfg: RLRunConfig, run_dir: str | Path):
        super().__init__(cfg, run_dir, 1)
        pairs = dpo_lib.read_pairs(self.cfg.rl.data)
        encoded = dpo_lib.encode_pairs(self.tok, pairs, self.cfg.model.block_size, self.template)
        vf = self.cfg.rl.val_fraction
        period = max(2, round(1 / vf)) if vf > 0 and len(encoded) >= 10 else 0
        self.val = [e for i, e in enumerate(encoded) if period and i % period == period // 2]
        self.train = [e for i, e in enumerate(encoded) if not (period and i % period == period // 2)]
        self.K = self.cfg.train.batch_size
        self.B = 2 * self.K
        self.rows = sharding.host_rows(self.mesh, self.B, "2 x train.batch_size")
        self.step_fn = self.ps.jit(dpo_lib.make_dpo_step(self.cfg.model, self.cfg.rl.dpo_beta, self.ps.tx,
                                                         self.n_vocab))
        self.eval_fn = jax.jit(dpo_lib.make_dpo_eval(self.cfg.model, self.cfg.rl.dpo_beta, self.n_vocab))

    def selection(self) -> tuple[str, str]:
        # Without held-out pairs, the training batch's loss stands in for the selection metric.
        return ("val_loss" if self.val else "loss"), "min"

    def batch(self, pairs, keep: slice = slice(None)) -> dict[str, np.ndarray]:
        return dpo_lib.pair_batch(pairs, self.tok.eos_id, self.cfg.model.block_size, keep)

    def begin(self, start: int) -> None:
        if jax.process_index() == 0:
            print(f"jaxgpt dpo: {len(self.train)} train pairs, {len(self.val)} held out, steps "
                  f"{start}->{self.cfg.train.steps}")

    def first_record(self) -> dict[str, Any] | None:
        return {"step": 0, **self.evaluate({"params": self.ref_params}, 0)} if self.val else None

    def step(self, state, step: int):
        rng = np.random.default_rng([self.cfg.seed, step])
        chosen = rng.choice(len(self.train), self.K, replace=len(self.train) < self.K)
        local = self.batch([self.train[i] for i in chosen], self.rows)
        state, metrics = self.step_fn(state, self.ref_params, self.global_batch(local))
        return state, _floats(metrics)

    def evaluate(self, state, step: int) -> dict[str, float]:
        """Held-out DPO loss, preference accuracy and margin, weighted by pairs."""
        if not self.val:
            return {}
        sums: dict[str, float] = {}
        for i in range(0, len(self.val), self.K):
            chunk = self.val[i:i + self.K]
            m = self.eval_fn(state["params"], self.ref_params, self.batch(chunk))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        return {f"val_{k}": v / len(self.val) for k, v in sums.items()}


def run(cfg: RLRunConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) an RL run: GRPO or DPO by cfg.rl.algorithm."""
    loop = DPOLoop(cfg, run_dir) if cfg.rl.algorithm == "dpo" else GRPOLoop(cfg, run_dir)
    return loop.run()
