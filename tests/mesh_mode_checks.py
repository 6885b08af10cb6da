"""Fine-tune (classify, SFT), GRPO and DPO steps on meshes of 8 simulated devices against one device.

test_mesh_modes.py runs this file in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
and reads the JSON it prints: per mode and mesh, the losses, the largest difference of the train state from
the one-device run, and the shard shapes the mesh gave a parameter, its Adam moment and a batch array.
"""

from __future__ import annotations

import contextlib
import json
import sys

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt.config import FinetuneConfig, MeshConfig, ModelConfig, RLConfig, TrainConfig
from jaxgpt.finetune import batches as batch_lib
from jaxgpt.finetune import optim, step as step_lib
from jaxgpt.finetune.heads import init_head
from jaxgpt.model import init_params
from jaxgpt.rl import dpo, grpo, policy
from jaxgpt.train.optimizer import make_optimizer

MODEL = ModelConfig(vocab_size=128, block_size=16, n_layer=1, n_head=4, n_embd=64, dtype="float32")
TRAIN = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1)
MESHES = [(8, 1, 1), (2, 2, 2)]
STEPS = 3  # the first at learning rate 0 (warmup)
P_, N_ = 8, 8  # GRPO prompt and completion slots
RL = RLConfig(minibatches=2, max_new_tokens=N_)


def finetune_mode(task: str):
    """(global batch rows, build(mesh or None) -> (state, step(state, batch)), batch(i, host rows) -> rows)."""
    rs = np.random.default_rng(1)
    ids = [rs.integers(1, 100, rs.integers(4, 15)).astype(np.int32) for _ in range(8 * STEPS)]
    if task == "classify":
        enc = batch_lib.Encoded(ids, label_N=rs.integers(0, 3, len(ids)).astype(np.int32))
    else:
        enc = batch_lib.Encoded(ids, in_loss=[(rs.random(len(i)) < 0.6).astype(np.float32) for i in ids])
    params = {"gpt": init_params(MODEL, jax.random.key(0))}
    if task == "classify":
        params["head"] = init_head(jax.random.key(1), MODEL.n_embd, 3)
    ft = FinetuneConfig(freeze="embed", layer_lr_decay=0.9) if task == "classify" else FinetuneConfig()
    trainable = optim.trainable_tree(params, MODEL, ft)
    tx, lr = optim.make_optimizer(TRAIN, MODEL, ft, params, trainable)

    def batch(i, rows):
        return batch_lib.make_batch(enc, np.arange(8 * i, 8 * i + 8), 8, 16, 0, rows)

    def build(mesh):
        args = (MODEL, task, "last", np.ones(3, np.float32), tx, lr, trainable)
        if mesh is None:
            fn = jax.jit(step_lib.make_finetune_step(*args))
            return step_lib.init_state(params, tx), lambda s, b: fn(s, b, jax.random.key(2), np.float32(1.0))
        steps = step_lib.build(*args, mesh, params, loss_chunk=4)  # SFT: the fused chunked loss vs one device unchunked
        fn = lambda s, b: steps.step(s, b, jax.random.key(2), np.float32(1.0))  # noqa: E731
        return step_lib.init_state(params, tx, steps.state_shardings), fn

    return 8, build, batch


def rl_mode(algorithm: str):
    rs = np.random.default_rng(2)
    params = init_params(MODEL, jax.random.key(0))
    tc = policy.updates_train_config(TRAIN, RL.minibatches if algorithm == "grpo" else 1)
    B = 16 if algorithm == "grpo" else 8
    if algorithm == "grpo":
        tokens_BxL = rs.integers(1, 100, (STEPS, B, P_ + N_)).astype(np.int32)
        tokens_BxL[:, :, :2] = -1  # left padding of the prompts
        full = [{"tokens_BxL": tokens_BxL[i], "start_B": np.full(B, 2, np.int32),
                 "mask_BxN": (rs.random((B, N_)) < 0.8).astype(np.float32),
                 "adv_B": rs.normal(size=B).astype(np.float32)} for i in range(STEPS)]
        old = jax.jit(lambda t, s: policy.gather(policy.completion_logprobs(MODEL, params, t, s, 128, P_), t[:, P_:]))
        for b in full:
            b["old_logp_BxN"] = np.asarray(old(b["tokens_BxL"], b["start_B"])) + rs.normal(0, 0.1, (B, N_)).astype(
                np.float32)
        fn, extra = grpo.make_rl_step(MODEL, RL, make_optimizer(tc), 128, P_), (jax.random.key(3),)

        def batch(i, rows):
            return {k: v[rows] for k, v in full[i].items()}
    else:
        def row():  # (token ids, index of the first response token)
            return list(rs.integers(1, 100, rs.integers(3, 12))), int(rs.integers(1, 3))

        pairs = [[(row(), row()) for _ in range(4)] for _ in range(STEPS)]
        fn, extra = dpo.make_dpo_step(MODEL, 0.1, make_optimizer(tc), 128), ()

        def batch(i, rows):
            return dpo.pair_batch(pairs[i], 0, 16, rows)

    def build(mesh):
        if mesh is None:
            tx = make_optimizer(tc)
            state = {"step": np.int32(0), "params": params, "opt_state": tx.init(params)}
            ref = jax.tree.map(np.asarray, params)
            jitted = jax.jit(fn)
            return state, lambda s, b: jitted(s, ref, b, *extra)
        ps = policy.policy_state(MODEL, tc, mesh)
        ref, jitted = ps.frozen_copy(params), ps.jit(fn, extra_args=len(extra))
        return ps.fresh(params), lambda s, b: jitted(s, ref, b, *extra)

    return B, build, batch


def shard_shape(a) -> list[int]:
    return list(a.addressable_shards[0].data.shape)


def run(make, mesh_shape):
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape)) if mesh_shape else None
    B, build, batch = make()
    state, step = build(mesh)
    losses = []
    with jax.set_mesh(mesh) if mesh else contextlib.nullcontext(), step_lib.rules():
        for i in range(STEPS):
            if mesh is None:
                b = batch(i, slice(None))
            else:  # what the loops do: this host's rows, then one global array per key
                b = sharding.global_batch(batch(i, sharding.host_rows(mesh, B)), mesh, B)
            state, metrics = step(state, b)
            losses.append(float(metrics["loss"]))
    out = {"losses": losses, "state": jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(state))}
    if mesh is not None:
        gpt = state["params"]["gpt"] if "gpt" in state["params"] else state["params"]
        kernel = gpt["h_0"]["mlp"]["c_fc"]["kernel"]
        moments = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "shape", None) == kernel.shape]
        out.update(kernel_shard=shard_shape(kernel), moment_shards=sorted({tuple(shard_shape(m)) for m in moments}),
                   kernel_sharding_named=isinstance(kernel.sharding, jax.sharding.NamedSharding),
                   batch_shard=shard_shape(next(iter(b.values()))), n_devices=len(kernel.sharding.device_set))
    return out


def rows_match_jax(mesh_shape, B=16) -> bool:
    """process_rows, with every device its own process, gives each device the rows JAX's sharding gives it."""
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape))
    ids_DxFxT = np.vectorize(lambda d: d.id)(mesh.devices)
    index_map = sharding.batch_sharding(mesh).devices_indices_map((B, 1))
    return all(sharding.process_rows(ids_DxFxT, B, d.id) == slice(*index_map[d][0].indices(B)[:2])
               for d in mesh.devices.flat)


def main():
    assert jax.device_count() == 8, jax.devices()
    modes = {"classify": lambda: finetune_mode("classify"), "sft": lambda: finetune_mode("sft"),
             "grpo": lambda: rl_mode("grpo"), "dpo": lambda: rl_mode("dpo")}
    result = {}
    for name, make in modes.items():
        ref = run(make, None)
        for shape in MESHES:
            got = run(make, shape)
            diffs = jax.tree.map(lambda a, b: np.max(np.abs(a - b), initial=0.0), got.pop("state"), ref["state"])
            result[f"{name} {shape}"] = {**got, "ref_losses": ref["losses"],
                                         "max_state_diff": float(max(jax.tree.leaves(diffs)))}
    result["rows_match_jax"] = all(rows_match_jax(s) for s in [(8, 1, 1), (2, 2, 2), (1, 8, 1), (2, 1, 4)])
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
