"""Pure training functions: the LM loss, `pretrain_step` and `eval_step` (jitted by the caller).

State is a plain dict {"step", "params", "opt_state"} so it can be saved, sharded and compared.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxgpt.cross_entropy import weighted_cross_entropy
from jaxgpt.model import GPT

State = dict[str, Any]


def lm_loss(model: GPT, params, x_BxT, y_BxT, dropout_rng=None, loss_chunk: int = 0) -> jax.Array:
    """Mean next-token cross-entropy (float32); `loss_chunk` > 0 computes the logits that many positions at a
    time, with the LM head's gradients fused into the forward pass (jaxgpt/cross_entropy.py)."""
    deterministic = dropout_rng is None
    rngs = None if deterministic else {"dropout": dropout_rng}
    h_BxTxD, _ = model.apply({"params": params}, x_BxT, deterministic=deterministic, rngs=rngs, return_hidden=True)
    weights_BxT = jnp.full(y_BxT.shape, 1 / y_BxT.size, jnp.float32)
    return weighted_cross_entropy(h_BxTxD, params["wte"], y_BxT, weights_BxT, loss_chunk)


def init_state(model: GPT, tx: optax.GradientTransformation, rng: jax.Array) -> State:
    """Boxed state (params and optimizer moments carry logical axis names); unbox before use."""
    tokens = jnp.zeros((1, min(model.cfg.block_size, 8)), jnp.int32)
    params = model.init(rng, tokens)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def make_pretrain_step(model: GPT, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                       grad_accum: int = 1, loss_chunk: int = 0) -> Callable:
    """pretrain_step(state, batch, rng) -> (state, metrics); micro-batches are accumulated in a scan."""
    use_dropout = model.cfg.dropout > 0

    def grads_of(params, x_BxT, y_BxT, rng):
        return jax.value_and_grad(lambda p: lm_loss(model, p, x_BxT, y_BxT, rng if use_dropout else None,
                                                         loss_chunk))(params)

    def pretrain_step(state: State, batch: dict[str, jax.Array], rng: jax.Array):
        rng = jax.random.fold_in(rng, state["step"])  # dropout noise is a function of (seed, step)
        params = state["params"]
        if grad_accum == 1:
            loss, grads = grads_of(params, batch["x"], batch["y"], rng)
        else:
            B, T = batch["x"].shape
            micro = jax.tree.map(lambda a: a.reshape(grad_accum, B // grad_accum, T), batch)

            def accumulate(carry, inputs):
                i, mb = inputs
                loss, grads = grads_of(params, mb["x"], mb["y"], jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
            loss, grads = jax.tree.map(lambda g: g / grad_accum, (loss, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        grad_norm = optax.tree.norm(grads)
        # The loop refuses to continue (or save) a step whose loss, gradients or new weights are NaN/Inf.
        params_finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state["step"]),
                   "params_finite": params_finite}
        return new_state, metrics

    return pretrain_step


def make_eval_step(model: GPT, loss_chunk: int = 0) -> Callable:
    def eval_step(params, batch: dict[str, jax.Array]) -> jax.Array:
        return lm_loss(model, params, batch["x"], batch["y"], loss_chunk=loss_chunk)

    return eval_step
