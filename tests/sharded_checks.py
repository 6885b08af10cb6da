"""Checks that need 8 (simulated) devices; test_sharding.py runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and reads the JSON it prints."""

from __future__ import annotations

import dataclasses
import json
import sys

import flax.linen as nn
import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt.config import MeshConfig, ModelConfig, TrainConfig
from jaxgpt.train import sharded

MODEL = ModelConfig(vocab_size=128, block_size=16, n_layer=2, n_head=4, n_embd=64)
TRAIN = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1)


def run(mesh_shape, model_cfg=MODEL, train_cfg=TRAIN):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), devices)
    rng = jax.random.key(0)
    fns = sharded.build(model_cfg, train_cfg, mesh, rng)
    data = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (TRAIN.steps, 8, 17)).astype(np.int32)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state = fns.init(rng)
        for batch in data:
            arrays = sharding.global_batch({"x": batch[:, :-1], "y": batch[:, 1:]}, mesh, 8)
            state, metrics = fns.step(state, arrays, rng)
            losses.append(float(metrics["loss"]))
    c_fc = state["params"]["h_0"]["mlp"]["c_fc"]["kernel"]
    c_attn = state["params"]["h_0"]["attn"]["c_attn"]["kernel"]
    mu = state["opt_state"][1][0].mu["h_0"]["mlp"]["c_fc"]["kernel"]  # chain(clip, adamw) -> adam's mu
    return {
        "losses": losses,
        "params": jax.tree.map(lambda a: np.asarray(a).tolist(), jax.device_get(state["params"]["h_1"]["mlp"])),
        "c_fc_shard": list(c_fc.addressable_shards[0].data.shape),
        "c_attn_shard": list(c_attn.addressable_shards[0].data.shape),
        "mu_shard": list(mu.addressable_shards[0].data.shape),
        "n_devices": len(c_fc.sharding.device_set),
    }


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {str(shape): run(shape) for shape in [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]}
    # The LM-head loss in chunks of 5 positions (block 16: a ragged last chunk) on a mixed mesh.
    out["(2, 2, 2) loss_chunk=5"] = run((2, 2, 2), train_cfg=dataclasses.replace(TRAIN, loss_chunk=5))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
