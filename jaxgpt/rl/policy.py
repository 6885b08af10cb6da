"""The policy as the RL and DPO steps see it: log-probabilities of token sequences, sampling through the
KV-cache decoder, and a sharded train state started from pretrained params.

Shape letters: B rows, P prompt slots (left-padded), N completion slots, L = P + N, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxgpt import sharding
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.generate import SamplingParams, decode, stop_array, traced_sampling
from jaxgpt.model import GPT
from jaxgpt.train.optimizer import make_optimizer
from jaxgpt.train.step import init_state

# Padded vocabulary entries get this logit rather than -inf, so p * (log p - log q) stays 0, not NaN.
_MASKED = -1e9


def next_token_logprobs(cfg: ModelConfig, params, tokens_BxL, start_B, n_vocab: int) -> jax.Array:
    """Bx(L-1)xV log-softmax of the next token at every slot but the last (deterministic: no dropout)."""
    tokens_BxL = jnp.maximum(tokens_BxL, 0)  # -1 marks padding and unused slots; any id will do, they are masked
    logits_BxTxV, _ = GPT(cfg).apply({"params": params}, tokens_BxL[:, :-1], start_B=start_B)
    logits_BxTxV = jnp.where(jnp.arange(cfg.vocab_size) < n_vocab, logits_BxTxV, _MASKED)
    return jax.nn.log_softmax(logits_BxTxV, axis=-1)


def completion_logprobs(cfg: ModelConfig, params, tokens_BxL, start_B, n_vocab: int, P: int) -> jax.Array:
    """BxNxV next-token log-probs at the slots that predict the completion tokens tokens_BxL[:, P:]."""
    return next_token_logprobs(cfg, params, tokens_BxL, start_B, n_vocab)[:, P - 1:]


def gather(logp_BxNxV: jax.Array, tokens_BxN: jax.Array) -> jax.Array:
    """BxN log-prob of each chosen token."""
    return jnp.take_along_axis(logp_BxNxV, jnp.maximum(tokens_BxN, 0)[..., None], axis=-1)[..., 0]


def completion_mask(completion_BxN: np.ndarray, eos_id: int) -> np.ndarray:
    """BxN float: the generated tokens up to and including the first end-of-text."""
    is_eos_BxN = completion_BxN == eos_id
    eos_before_BxN = np.cumsum(is_eos_BxN, axis=1) - is_eos_BxN > 0
    return (~eos_before_BxN & (completion_BxN >= 0)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _sampler(cfg: ModelConfig, max_new_tokens: int):
    """Jitted prefill + decode returning every slot (prompt and completion), BxL."""

    def sample(params, prompt_BxP, start_B, keys_B, sampling, eos_id, n_vocab, stop_SxM):
        new_BxN, _ = decode(cfg, params, prompt_BxP, start_B, keys_B, max_new_tokens, sampling, eos_id, n_vocab,
                            stop_SxM, max_new_tokens, 0)
        real_BxP = jnp.arange(prompt_BxP.shape[1])[None, :] >= start_B[:, None]
        return jnp.concatenate([jnp.where(real_BxP, prompt_BxP, -1), new_BxN], axis=1)

    return jax.jit(sample)


def sample(cfg: ModelConfig, params, prompt_BxP: np.ndarray, start_B: np.ndarray, keys_B: jax.Array,
           max_new_tokens: int, eos_id: int, n_vocab: int, temperature: float = 1.0, top_k: int = 0) -> np.ndarray:
    """BxL token ids: the left-padded prompts (-1 for padding) and their sampled completions (-1 after a row ended
    early enough that every row stopped)."""
    sampling = traced_sampling(SamplingParams(temperature=temperature, top_k=top_k))
    seq_BxL = _sampler(cfg, max_new_tokens)(params, prompt_BxP, start_B, keys_B, sampling, np.int32(eos_id),
                                            np.int32(n_vocab), stop_array(None))
    return np.asarray(seq_BxL)


def row_keys(seed: int, step: int, rows: int) -> jax.Array:
    """One sampling key per row, a function of (seed, step, row) only: a resumed run samples the same."""
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(rows))


def updates_train_config(tc: TrainConfig, updates_per_step: int) -> TrainConfig:
    """The schedule counts optimizer updates, and an RL step makes `updates_per_step` of them."""
    return dataclasses.replace(tc, steps=tc.steps * updates_per_step, warmup_steps=tc.warmup_steps * updates_per_step)


@dataclass
class PolicyState:
    mesh: Mesh
    tx: optax.GradientTransformation
    shardings: Any  # of the train state {"step", "params", "opt_state"}
    abstract: Any  # ShapeDtypeStructs with shardings, for restores

    def fresh(self, params) -> dict[str, Any]:
        """A train state at step 0 with `params` placed on the mesh."""
        params = jax.device_put(params, self.shardings["params"])
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_state}

    def frozen_copy(self, params):
        """A copy in its own buffers: the train state is donated, the reference must outlive it."""
        return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.shardings["params"])(params)

    def jit(self, fn, extra_args: int = 0):
        """fn(state, ref_params, batch, *replicated) jitted with the state's shardings in and out and the batch
        split by rows; the state is donated."""
        replicated = sharding.replicated(self.mesh)
        return jax.jit(fn, in_shardings=(self.shardings, self.shardings["params"], sharding.batch_sharding(self.mesh),
                                         *([replicated] * extra_args)),
                       out_shardings=(self.shardings, replicated), donate_argnums=0)


def policy_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh) -> PolicyState:
    """Shardings for a state of this model from jaxgpt.sharding's logical-axis rules."""
    tx = make_optimizer(train_cfg)
    boxed = jax.eval_shape(functools.partial(init_state, GPT(model_cfg), tx), jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                            shardings)
    return PolicyState(mesh, tx, shardings, abstract)
