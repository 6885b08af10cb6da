"""The jitted fine-tune step and evaluation step, placed on the run's mesh.

`finetune_step(state, batch, rng, lr_scale) -> (state, metrics)` is separate from `pretrain_step`:
padded, masked batches, a task loss, frozen gradients zeroed, and an LR scale from reduce-on-plateau
(a traced scalar, so changing it never recompiles). The GPT params are sharded by their logical axis
names through `jaxgpt.sharding`, the head is replicated, and the batch is split along the batch axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt import sharding
from jaxgpt.config import ModelConfig
from jaxgpt.finetune.heads import class_logits, sft_token_losses, task_loss
from jaxgpt.finetune.optim import zero_frozen
from jaxgpt.model import GPT

State = dict[str, Any]


def make_finetune_step(model_cfg: ModelConfig, task: str, pooling: str, class_weight_C, tx, lr_schedule,
                       trainable) -> Callable:
    use_dropout = model_cfg.dropout > 0
    class_weight_C = jnp.asarray(class_weight_C, jnp.float32)

    def finetune_step(state: State, batch: dict[str, jax.Array], rng: jax.Array, lr_scale: jax.Array):
        rng = jax.random.fold_in(rng, state["step"])  # dropout noise is a function of (seed, step)
        params = state["params"]
        loss, grads = jax.value_and_grad(lambda p: task_loss(
            model_cfg, task, pooling, class_weight_C, p, batch, rng if use_dropout else None))(params)
        grads = zero_frozen(grads, trainable)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": lr_schedule(state["step"]) * lr_scale}
        return new_state, metrics

    return finetune_step


def make_eval_step(model_cfg: ModelConfig, task: str, pooling: str) -> Callable:
    """classify: (params, batch) -> logits_BxC; sft: -> (sum of token losses, token count)."""

    def eval_step(params, batch):
        if task == "classify":
            return class_logits(model_cfg, params, batch["tokens"], batch["start"], pooling)
        return sft_token_losses(model_cfg, params, batch)

    return eval_step


@dataclass
class Steps:
    mesh: Mesh
    param_shardings: Any
    step: Callable
    eval: Callable

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One process's full batch, split along the mesh's batch axes."""
        return {k: jax.device_put(v, NamedSharding(self.mesh, P(("data", "fsdp"), *[None] * (v.ndim - 1))))
                for k, v in batch.items()}


def param_shardings(model_cfg: ModelConfig, mesh: Mesh, has_head: bool):
    """GPT params by their logical axes; the (small) head replicated."""
    tokens = jnp.zeros((1, min(model_cfg.block_size, 8)), jnp.int32)
    boxed = jax.eval_shape(lambda: GPT(model_cfg).init(jax.random.key(0), tokens)["params"])
    out = {"gpt": sharding.logical_shardings(boxed, mesh)}
    if has_head:
        out["head"] = {"kernel": sharding.replicated(mesh), "bias": sharding.replicated(mesh)}
    return out


def build(model_cfg: ModelConfig, task: str, pooling: str, class_weight_C, tx, lr_schedule, trainable,
          mesh: Mesh) -> Steps:
    shardings = param_shardings(model_cfg, mesh, task == "classify")
    # Optimizer-state shardings follow the params through XLA's propagation; the state is donated.
    step = jax.jit(make_finetune_step(model_cfg, task, pooling, class_weight_C, tx, lr_schedule, trainable),
                   donate_argnums=0)
    evaluate = jax.jit(make_eval_step(model_cfg, task, pooling))
    return Steps(mesh, shardings, step, evaluate)


def init_state(params, tx, shardings) -> State:
    params = jax.device_put(params, shardings)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params)}


def rules():
    """The logical-axis rules context the model's sharding constraints resolve in."""
    return nn.logical_axis_rules(sharding.RULES)
