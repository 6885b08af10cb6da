"""Jitted, sharded versions of the pure training functions for one mesh.

Shardings come from the model's logical axis names through `jaxgpt.sharding.RULES`: the same code
is data parallel, FSDP or tensor parallel depending only on the mesh shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh

from jaxgpt import sharding
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.model import GPT
from jaxgpt.train.optimizer import make_optimizer, schedule
from jaxgpt.train.step import init_state, make_eval_step, make_pretrain_step


@dataclass
class ShardedSteps:
    mesh: Mesh
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying their target shardings (for restores)
    init: Callable  # rng -> state
    step: Callable  # (state, batch, rng) -> (state, metrics); state is donated
    eval: Callable  # (params, batch) -> loss


def build(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, init_rng: jax.Array) -> ShardedSteps:
    model = GPT(model_cfg)
    tx = make_optimizer(train_cfg)
    boxed = jax.eval_shape(functools.partial(init_state, model, tx), init_rng)
    state_shardings = sharding.logical_shardings(boxed, mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  nn.unbox(boxed), state_shardings)
    batch = {"x": sharding.batch_sharding(mesh), "y": sharding.batch_sharding(mesh)}
    replicated = sharding.replicated(mesh)
    init = jax.jit(lambda rng: nn.unbox(init_state(model, tx, rng)), out_shardings=state_shardings)
    step = jax.jit(make_pretrain_step(model, tx, schedule(train_cfg), train_cfg.grad_accum,
                                     train_cfg.loss_chunk),
                   in_shardings=(state_shardings, batch, replicated), out_shardings=(state_shardings, replicated),
                   donate_argnums=0)
    evaluate = jax.jit(make_eval_step(model, train_cfg.loss_chunk), in_shardings=(state_shardings["params"], batch),
                       out_shardings=replicated)
    return ShardedSteps(mesh, state_shardings, abstract_state, init, step, evaluate)
