"""The jitted fine-tune step and evaluation step, placed on the run's mesh.

`finetune_step(state, batch, rng, lr_scale) -> (state, metrics)` is separate from `pretrain_step`:
padded, masked batches, a task loss, frozen gradients zeroed, and an LR scale from reduce-on-plateau
(a traced scalar, so changing it never recompiles). The GPT params are sharded by their logical axis
names through `jaxgpt.sharding`, the head is replicated, optimizer moments follow their parameters, and the
batch is split along the batch axes; the step is jitted with these shardings in and out, as pretraining's is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxgpt import sharding
from jaxgpt.config import ModelConfig
from jaxgpt.finetune.heads import class_logits, sft_token_losses, task_loss
from jaxgpt.finetune.optim import zero_frozen
from jaxgpt.model import GPT

State = dict[str, Any]


def make_finetune_step(model_cfg: ModelConfig, task: str, pooling: str, class_weight_C, tx, lr_schedule,
                       trainable, loss_chunk: int = 0) -> Callable:
    use_dropout = model_cfg.dropout > 0
    class_weight_C = jnp.asarray(class_weight_C, jnp.float32)

    def finetune_step(state: State, batch: dict[str, jax.Array], rng: jax.Array, lr_scale: jax.Array):
        rng = jax.random.fold_in(rng, state["step"])  # dropout noise is a function of (seed, step)
        params = state["params"]
        loss, grads = jax.value_and_grad(lambda p: task_loss(
            model_cfg, task, pooling, class_weight_C, p, batch, rng if use_dropout else None, loss_chunk))(params)
        grads = zero_frozen(grads, trainable)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": lr_schedule(state["step"]) * lr_scale}
        return new_state, metrics

    return finetune_step


def make_eval_step(model_cfg: ModelConfig, task: str, pooling: str, loss_chunk: int = 0) -> Callable:
    """classify: (params, batch) -> logits_BxC; sft: -> (sum of token losses, token count)."""

    def eval_step(params, batch):
        if task == "classify":
            return class_logits(model_cfg, params, batch["tokens"], batch["start"], pooling)
        return sft_token_losses(model_cfg, params, batch, loss_chunk=loss_chunk)

    return eval_step


@dataclass
class Steps:
    mesh: Mesh
    state_shardings: Any  # of the train state {"step", "params", "opt_state"}
    step: Callable
    eval: Callable

    def put_eval(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """An evaluation batch (every host holds all of it), split along the mesh's batch axes."""
        return jax.device_put(batch, sharding.batch_sharding(self.mesh))


def state_shardings(model_cfg: ModelConfig, params, tx, mesh: Mesh) -> dict[str, Any]:
    """GPT params by their logical axes, the (small) head replicated; optimizer moments follow their params."""
    tokens = jnp.zeros((1, min(model_cfg.block_size, 8)), jnp.int32)
    boxed = jax.eval_shape(lambda: GPT(model_cfg).init(jax.random.key(0), tokens)["params"])
    replicated = sharding.replicated(mesh)
    params_s = {"gpt": sharding.logical_shardings(boxed, mesh),
                **({"head": jax.tree.map(lambda _: replicated, params["head"])} if "head" in params else {})}
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (frozen params: no moments)
    opt_s = optax.tree_utils.tree_map_params(tx, lambda p, s: p if masked(p) else s, jax.eval_shape(tx.init, params),
                                             params_s, transform_non_params=lambda _: replicated, is_leaf=masked)
    return {"step": replicated, "params": params_s, "opt_state": opt_s}


def build(model_cfg: ModelConfig, task: str, pooling: str, class_weight_C, tx, lr_schedule, trainable,
          mesh: Mesh, params, loss_chunk: int = 0) -> Steps:
    """The jitted steps for `params`' tree on `mesh`; the train state keeps its shardings and is donated."""
    shardings = state_shardings(model_cfg, params, tx, mesh)
    replicated = sharding.replicated(mesh)
    step = jax.jit(make_finetune_step(model_cfg, task, pooling, class_weight_C, tx, lr_schedule, trainable, loss_chunk),
                   in_shardings=(shardings, sharding.batch_sharding(mesh), replicated, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(make_eval_step(model_cfg, task, pooling, loss_chunk))
    return Steps(mesh, shardings, step, evaluate)


def init_state(params, tx, shardings=None) -> State:
    """Step 0 with `params`, placed by `shardings` (of the whole state; None: where the params are)."""
    if shardings is not None:
        params = jax.device_put(params, shardings["params"])
    return jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
                   out_shardings=shardings)(params)


def rules():
    """The logical-axis rules context the model's sharding constraints resolve in."""
    return nn.logical_axis_rules(sharding.RULES)
