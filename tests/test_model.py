import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import PRESETS, ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.model import GPT, flops_per_token, init_cache, init_params, mixed_dot, param_count, validate

CFG = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def tokens(B, T, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, CFG.vocab_size)


def test_shapes_and_gpt2_names(params):
    logits, cache = GPT(CFG).apply({"params": params}, tokens(3, 20))
    assert logits.shape == (3, 20, CFG.vocab_size) and logits.dtype == jnp.float32 and cache is None
    assert set(params) == {"wte", "wpe", "h_0", "h_1", "ln_f"}
    assert set(params["h_0"]) == {"ln_1", "attn", "ln_2", "mlp"}
    assert set(params["h_0"]["attn"]) == {"c_attn", "c_proj"} and set(params["h_0"]["mlp"]) == {"c_fc", "c_proj"}


def test_every_param_has_logical_axes():
    boxed = GPT(CFG).init(jax.random.key(0), tokens(1, 4))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(x, "names") and len(x.names) == x.value.ndim for x in leaves)


def _reference_forward(p, ids):
    """GPT-2 forward in float64 numpy, written independently of the flax module."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    def ln(x, q):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    T = len(ids)
    K = CFG.n_embd // CFG.n_head
    x = p["wte"][ids] + p["wpe"][:T]
    for i in range(CFG.n_layer):
        b = p[f"h_{i}"]
        h = ln(x, b["ln_1"])
        qkv = np.einsum("td,dchk->tchk", h, b["attn"]["c_attn"]["kernel"]) + b["attn"]["c_attn"]["bias"]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        att = np.einsum("thk,shk->hts", q, k) / np.sqrt(K)
        att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shk->thk", att, v)
        x = x + np.einsum("thk,hkd->td", o, b["attn"]["c_proj"]["kernel"]) + b["attn"]["c_proj"]["bias"]
        h = ln(x, b["ln_2"])
        h = gelu(h @ b["mlp"]["c_fc"]["kernel"] + b["mlp"]["c_fc"]["bias"])
        x = x + h @ b["mlp"]["c_proj"]["kernel"] + b["mlp"]["c_proj"]["bias"]
    return ln(x, p["ln_f"]) @ p["wte"].T


def test_matches_float64_reference(params):
    # Larger-than-init weights so attention is far from uniform and errors would show.
    scaled = jax.tree.map(lambda a: a * 4 if a.ndim > 1 else a + 0.1, params)
    ids = np.asarray(tokens(1, 24)[0])
    ours, _ = GPT(CFG).apply({"params": scaled}, ids[None])
    np.testing.assert_allclose(np.asarray(ours[0]), _reference_forward(scaled, ids), rtol=1e-4, atol=1e-4)


def test_causal_future_tokens_change_no_earlier_logit(params):
    x = tokens(2, 16)
    y = x.at[:, 9].set((x[:, 9] + 1) % CFG.vocab_size)
    a, _ = GPT(CFG).apply({"params": params}, x)
    b, _ = GPT(CFG).apply({"params": params}, y)
    np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b[:, :9]))
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_causal_by_gradient(params):

    # d logits[t=5] / d embeddings of later positions is zero.
    x = tokens(1, 12)

    def f(wpe):
        p = {**params, "wpe": wpe}
        logits, _ = GPT(CFG).apply({"params": p}, x)
        return logits[0, 5].sum()

    g = jax.grad(f)(params["wpe"])
    assert np.all(np.asarray(g[6:12]) == 0) and np.any(np.asarray(g[:6]) != 0)


def test_kv_cache_matches_full_forward(params):
    x = tokens(2, 20)
    full, _ = GPT(CFG).apply({"params": params}, x)
    cache = init_cache(CFG, 2, 24)
    chunk, cache = GPT(CFG).apply({"params": params}, x[:, :13], cache=cache, cache_index=0)
    steps = [chunk]
    for t in range(13, 20):
        logits, cache = GPT(CFG).apply({"params": params}, x[:, t:t + 1], cache=cache, cache_index=t)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=2e-5)


def test_left_padding_matches_unpadded(params):
    x = tokens(1, 10)
    plain, _ = GPT(CFG).apply({"params": params}, x)
    padded_x = jnp.concatenate([jnp.zeros((1, 6), jnp.int32), x], 1)
    padded, _ = GPT(CFG).apply({"params": params}, padded_x, start_B=jnp.array([6]),
                               cache=init_cache(CFG, 1, 16))
    np.testing.assert_allclose(np.asarray(padded[:, 6:]), np.asarray(plain), atol=2e-5)


def test_dropout_only_in_training(params):
    cfg = ModelConfig(**{**CFG.__dict__, "dropout": 0.2})
    x = tokens(2, 16)
    det, _ = GPT(cfg).apply({"params": params}, x)
    base, _ = GPT(CFG).apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(det), np.asarray(base), atol=1e-6)
    a, _ = GPT(cfg).apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b, _ = GPT(cfg).apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b) and not np.allclose(a, det)


def test_gpt2_preset_sizes_and_flops():
    sizes = {"gpt2": 124.4e6, "gpt2-medium": 354.8e6}  # GPT-2 with its 50257 vocab padded to 50304
    for name, expected in sizes.items():
        cfg = ModelConfig(**PRESETS[name])
        shapes = jax.eval_shape(lambda c=cfg: init_params(c, jax.random.key(0)))
        assert abs(param_count(shapes) - expected) / expected < 0.01
    cfg = ModelConfig(**PRESETS["gpt2"])
    assert flops_per_token(cfg) == pytest.approx(6 * (12 * 12 * 768**2 + 50304 * 768) + 12 * 12 * 768 * 1024)


def test_bad_model_config():
    with pytest.raises(JaxgptError, match="divisible"):
        validate(ModelConfig(vocab_size=10, n_embd=30, n_head=4))


@pytest.mark.parametrize("remat, scan", [("full", False), ("dots_saveable", True), ("none", True)])
def test_remat_and_scan_give_the_same_loss_and_gradients(params, remat, scan):
    import dataclasses

    from jaxgpt.model import stack_layers, unstack_layers

    x = tokens(2, 16)

    def loss(p, cfg):
        return GPT(cfg).apply({"params": p}, x)[0].astype(jnp.float32).std()

    ref_loss, ref_grads = jax.value_and_grad(loss)(params, CFG)
    cfg = dataclasses.replace(CFG, remat=remat, scan_layers=scan)
    p = stack_layers(params, CFG.n_layer) if scan else params
    got_loss, got_grads = jax.value_and_grad(loss)(p, cfg)
    got_grads = unstack_layers(got_grads, CFG.n_layer) if scan else got_grads
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_blockwise_attention_equals_fused(params):
    import dataclasses

    cfg = dataclasses.replace(CFG, block_size=256)
    p = {**params, "wpe": jnp.tile(params["wpe"], (8, 1))}
    x = jax.random.randint(jax.random.key(3), (2, 256), 0, CFG.vocab_size)

    def loss(p, attention):
        return GPT(dataclasses.replace(cfg, attention=attention)).apply({"params": p}, x)[0].std()

    (a, ga), (b, gb) = (jax.value_and_grad(loss)(p, impl) for impl in ("xla", "blockwise"))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), atol=2e-6)


@pytest.mark.parametrize("x_shape, w_shape, n_in", [
    ((2, 5, 8), (8, 3, 2, 4), 1),   # c_attn: several output axes
    ((2, 5, 2, 4), (2, 4, 8), 2),   # attn c_proj: several input axes
    ((2, 5, 8), (8, 12), 1),        # mlp
])
def test_mixed_dot_gradients_equal_autodiff_and_run_in_bfloat16(x_shape, w_shape, n_in):
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    contract = list(range(len(x_shape) - n_in, len(x_shape)))
    plain = lambda x, w: jnp.tensordot(x, w, (contract, list(range(n_in))))  # noqa: E731
    probe = jax.random.normal(jax.random.key(2), plain(x, w).shape)
    loss = lambda dot: lambda x, w: (dot(x, w) * probe).sum()  # noqa: E731
    want = jax.grad(loss(plain), (0, 1))(x, w)
    got = jax.grad(loss(lambda x, w: mixed_dot(x, w, n_in)), (0, 1))(x, w)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    bf16 = jax.jit(jax.grad(loss(lambda x, w: mixed_dot(x, w, n_in)), (0, 1)))(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    for a, b in zip(bf16, want):  # XLA's CPU runtime rejected one bf16 weight-gradient layout once
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.1)
