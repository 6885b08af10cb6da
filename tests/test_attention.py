"""Attention paths: the splash kernel (Pallas interpret mode on the CPU) equals XLA's attention, forward and
backward, with and without left padding; `auto` picks the path each platform should take."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import attention
from jaxgpt.attention import attend, attention_mask, choose, splash_attention
from jaxgpt.config import ModelConfig
from jaxgpt.model import GPT, init_params

B, T, H, K = 2, 256, 2, 32  # two 128-token blocks, so the kernel skips a fully masked block


def qkv(seed=0):
    return tuple(jax.random.normal(jax.random.key(seed + i), (B, T, H, K)) for i in range(3))


def reference(q, k, v, start_B=None):
    mask = None if start_B is None else attention_mask(T, T, 0, start_B)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None)


def test_splash_equals_xla_causal_forward_and_gradients():
    q, k, v = qkv()
    np.testing.assert_allclose(splash_attention(q, k, v, interpret=True), reference(q, k, v), atol=1e-5)
    w = jax.random.normal(jax.random.key(9), (B, T, H, K))  # a loss that weighs every output differently
    got = jax.grad(lambda q, k, v: (splash_attention(q, k, v, interpret=True) * w).sum(), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda q, k, v: (reference(q, k, v) * w).sum(), (0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("length", [256, 512])
def test_blockwise_equals_a_float64_reference_forward_and_gradients(length):
    # The custom gradient (row sums from dout * out, key/value gradients summed over query blocks) against
    # plain softmax attention autodiffed in float64.
    qkv_ = tuple(jax.random.normal(jax.random.key(i), (2, length, 2, 32)) for i in range(3))
    w = jax.random.normal(jax.random.key(9), (2, length, 2, 32))

    def exact(q, k, v):
        logits = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(32)
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
        return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v)

    with jax.enable_x64():
        q64, k64, v64 = (np.asarray(x, np.float64) for x in qkv_)
        want_out = np.asarray(exact(q64, k64, v64))
        want_grads = jax.grad(lambda q, k, v: (exact(q, k, v) * np.asarray(w, np.float64)).sum(), (0, 1, 2))(
            q64, k64, v64)
        want_grads = [np.asarray(g) for g in want_grads]
    np.testing.assert_allclose(attention.blockwise_causal_attention(*qkv_), want_out, atol=2e-6)
    got_grads = jax.grad(lambda q, k, v: (attention.blockwise_causal_attention(q, k, v) * w).sum(), (0, 1, 2))(*qkv_)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_blockwise_in_bfloat16_is_close_to_float32():
    q, k, v = qkv()
    w = jax.random.normal(jax.random.key(9), (B, T, H, K))
    loss = lambda q, k, v: (attention.blockwise_causal_attention(q, k, v).astype(jnp.float32) * w).sum()  # noqa: E731
    want = jax.grad(loss, (0, 1, 2))(q, k, v)
    got = jax.grad(loss, (0, 1, 2))(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("with_padding", [False, True])
def test_single_query_attention_equals_dot_product_attention(with_padding):
    # One decoding step against a cache of 40 slots, 30 of them written, rows left-padded by 0/3/7 slots.
    Bq, S, written = 3, 40, 30
    q = jax.random.normal(jax.random.key(0), (Bq, 1, H, K))
    k, v = (jax.random.normal(jax.random.key(i), (Bq, S, H, K)) for i in (1, 2))
    start_B = jnp.array([0, 3, 7]) if with_padding else None
    mask = attention_mask(1, S, written, start_B)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(attention.single_query_attention(q, k, v, mask), want, atol=1e-6)
    np.testing.assert_allclose(attend("auto", q, k, v, mask), want, atol=1e-6)  # the path auto takes on CPU


def test_splash_with_left_padding_equals_masked_xla():
    q, k, v = qkv(3)
    start_B = jnp.array([0, 100])  # row 1: 100 padding slots, then text
    not_pad_BxT = jnp.arange(T)[None, :] >= start_B[:, None]
    text_BxTx1x1 = not_pad_BxT[:, :, None, None]  # padding rows' outputs are never used

    def loss(fn, q, k, v):
        return jnp.where(text_BxTx1x1, fn(q, k, v) ** 2, 0).sum()

    splash = lambda q, k, v: splash_attention(q, k, v, not_pad_BxT, interpret=True)  # noqa: E731
    xla = lambda q, k, v: reference(q, k, v, start_B)  # noqa: E731
    np.testing.assert_allclose(jnp.where(text_BxTx1x1, splash(q, k, v), 0),
                               jnp.where(text_BxTx1x1, xla(q, k, v), 0), atol=1e-5)
    for a, b in zip(jax.grad(loss, (1, 2, 3))(splash, q, k, v), jax.grad(loss, (1, 2, 3))(xla, q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert not np.isnan(np.asarray(splash(q, k, v))).any()  # padding rows see padding, never nothing


def test_model_with_splash_equals_xla_including_left_padding():
    cfg = ModelConfig(vocab_size=64, block_size=128, n_layer=1, n_head=2, n_embd=64, dtype="float32")
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (2, 128), 0, 64)
    start_B = jnp.array([0, 40])
    text_Bx1x1 = (jnp.arange(128)[None, :] >= start_B[:, None])[..., None]

    def loss(p, impl, start):
        logits, _ = GPT(dataclasses.replace(cfg, attention=impl)).apply({"params": p}, x, start_B=start)
        return jnp.where(text_Bx1x1, logits, 0).std()

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    for start in (None, start_B):
        (a, ga), (b, gb) = (value_and_grad(params, impl, start) for impl in ("xla", "splash"))
        np.testing.assert_allclose(a, b, rtol=1e-5)
        for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(u, w, atol=1e-5)


@pytest.mark.parametrize("where, attn, T_, S, dtype, has_mask, want", [
    ("nvidia", "auto", 1024, 1024, jnp.bfloat16, False, "cudnn"),
    ("nvidia", "auto", 1024, 1024, jnp.float16, False, "cudnn"),
    ("nvidia", "auto", 1024, 1024, jnp.float32, False, "xla"),     # cuDNN takes half precision only
    ("nvidia", "auto", 1024, 1024, jnp.bfloat16, True, "xla"),     # padding or a cache: explicit mask
    ("nvidia", "xla", 1024, 1024, jnp.bfloat16, False, "xla"),
    ("gpu", "auto", 1024, 1024, jnp.bfloat16, False, "xla"),       # not NVIDIA: no cuDNN
    ("tpu", "auto", 1024, 1024, jnp.bfloat16, False, "splash"),
    ("tpu", "auto", 1024, 1024, jnp.bfloat16, True, "splash"),     # left padding as segment ids
    ("tpu", "auto", 1, 1024, jnp.bfloat16, True, "xla"),           # decoding against a cache
    ("tpu", "auto", 100, 100, jnp.bfloat16, False, "xla"),         # not whole 128-token blocks
    ("cpu", "auto", 512, 512, jnp.float32, False, "blockwise"),
    ("cpu", "auto", 256, 256, jnp.float32, False, "blockwise"),
    ("cpu", "auto", 128, 128, jnp.float32, False, "xla"),          # one block: nothing to skip
    ("cpu", "auto", 512, 512, jnp.float32, True, "xla"),
    ("cpu", "splash", 256, 256, jnp.float32, True, "splash"),
    ("cpu", "splash", 1, 256, jnp.float32, True, "xla"),
    ("cpu", "cudnn", 256, 256, jnp.bfloat16, False, "cudnn"),
])
def test_auto_picks_per_platform(monkeypatch, where, attn, T_, S, dtype, has_mask, want):
    monkeypatch.setattr(attention, "platform", lambda: where)
    assert choose(attn, T_, S, 64, dtype, has_mask) == want


def test_auto_on_nvidia_asks_dot_product_attention_for_cudnn(monkeypatch):
    seen = []
    monkeypatch.setattr(attention, "platform", lambda: "nvidia")
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: seen.append(kw) or a[0])
    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    attend("auto", q, q, q, None)
    attend("auto", q.astype(jnp.float32), q, q, None)
    assert [(kw["implementation"], kw["is_causal"]) for kw in seen] == [("cudnn", True), (None, True)]


SHARDED = textwrap.dedent("""
    import json, flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from jaxgpt import sharding
    from jaxgpt.attention import attention_mask, splash_attention
    from jaxgpt.config import MeshConfig
    q, k, v = (jax.random.normal(jax.random.key(i), (4, 128, 2, 32)) for i in range(3))
    start_B = jnp.array([0, 5, 60, 127])
    not_pad = jnp.arange(128)[None, :] >= start_B[:, None]
    mesh = sharding.make_mesh(MeshConfig(2, 1, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        f = jax.jit(lambda q, k, v: splash_attention(q, k, v, not_pad, interpret=True))
        got = f(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(128, 128, 0, start_B))
    err = float(jnp.abs(jnp.where(not_pad[:, :, None, None], got - want, 0)).max())
    print(json.dumps({"err": err, "devices": len(got.sharding.device_set)}))
""")


def test_splash_under_a_mesh_runs_per_shard(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-5 and result["devices"] == 4


@pytest.mark.skipif(attention.platform() != "nvidia", reason="needs an NVIDIA GPU (scripts/gpu_check.sh runs it)")
def test_cudnn_equals_xla_on_nvidia():
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv())
    w = jax.random.normal(jax.random.key(9), (B, T, H, K))

    def loss(impl, q, k, v):
        return (attend(impl, q, k, v, None).astype(jnp.float32) * w).sum()

    np.testing.assert_allclose(attend("cudnn", q, k, v, None).astype(jnp.float32),
                               attend("xla", q, k, v, None).astype(jnp.float32), atol=2e-2)
    for a, b in zip(jax.grad(loss, (1, 2, 3))("cudnn", q, k, v), jax.grad(loss, (1, 2, 3))("xla", q, k, v)):
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=5e-2, rtol=5e-2)
