"""The chunked LM-head loss equals the loss over full logits: values and gradients, masks, ragged chunks;
the fused weighted loss (gradients taken in the forward pass) too, in float32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.cross_entropy import token_cross_entropy, weighted_cross_entropy
from jaxgpt.model import GPT, init_params
from jaxgpt.train.step import lm_loss

B, T, D, V = 3, 13, 16, 40  # T = 13 is not a multiple of any chunk below


def full_logits_loss(h_BxTxD, wte_VxD, targets_BxT, mask_BxT):
    """The reference: optax over the whole batch's float32 logits, masked mean."""
    logits_BxTxV = jnp.einsum("btd,vd->btv", h_BxTxD, wte_VxD, preferred_element_type=jnp.float32)
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    return (ce_BxT * mask_BxT).sum() / mask_BxT.sum()


def chunked_loss(chunk):
    def loss(h_BxTxD, wte_VxD, targets_BxT, mask_BxT):
        return (token_cross_entropy(h_BxTxD, wte_VxD, targets_BxT, chunk) * mask_BxT).sum() / mask_BxT.sum()
    return loss


@pytest.fixture(scope="module")
def inputs():
    rs = np.random.default_rng(0)
    h_BxTxD = jnp.asarray(rs.normal(size=(B, T, D)), jnp.float32)
    wte_VxD = jnp.asarray(rs.normal(size=(V, D)), jnp.float32)
    targets_BxT = rs.integers(0, V, (B, T)).astype(np.int32)
    mask_BxT = np.ones((B, T), np.float32)
    mask_BxT[0, :4] = 0  # a left-padded prompt: no loss there
    mask_BxT[2, -5:] = 0  # right padding past the end of a sequence ...
    targets_BxT[2, -5:] = -1  # ... whose targets are filler ids
    return h_BxTxD, wte_VxD, jnp.asarray(targets_BxT), jnp.asarray(mask_BxT)


@pytest.mark.parametrize("chunk", [1, 4, 5, 8, 12, 13, 64])
def test_chunked_loss_and_gradients_equal_full_logits(inputs, chunk):
    ref_loss, ref_grads = jax.value_and_grad(full_logits_loss, argnums=(0, 1))(*inputs)
    loss, grads = jax.jit(jax.value_and_grad(chunked_loss(chunk), argnums=(0, 1)))(*inputs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(grads[0])[0, :4]), "masked positions get no gradient"


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 13, 64])
def test_fused_weighted_loss_and_gradients_equal_full_logits(inputs, chunk):
    h_BxTxD, wte_VxD, targets_BxT, mask_BxT = inputs
    weights_BxT = mask_BxT / mask_BxT.sum()
    ref_loss, ref_grads = jax.value_and_grad(full_logits_loss, argnums=(0, 1))(*inputs)
    fused = lambda h, w, s: s * weighted_cross_entropy(h, w, targets_BxT, weights_BxT, chunk)  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h_BxTxD, wte_VxD, 1.0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(grads[0])[0, :4]), "masked positions get no gradient"
    # The incoming cotangent scales the gradients taken in the forward pass (here a factor of 3).
    grads3 = jax.grad(fused, argnums=(0, 1))(h_BxTxD, wte_VxD, 3.0)
    for got, want in zip(grads3, ref_grads):
        np.testing.assert_allclose(got, 3 * np.asarray(want), rtol=1e-5, atol=1e-6)
    # The weights' own gradient is each token's cross-entropy.
    ce_BxT = token_cross_entropy(h_BxTxD, wte_VxD, targets_BxT)
    dweights = jax.grad(lambda w: weighted_cross_entropy(h_BxTxD, wte_VxD, targets_BxT, w, chunk))(weights_BxT)
    np.testing.assert_allclose(dweights, ce_BxT, rtol=1e-6)


def test_fused_weighted_loss_in_bf16_is_close_to_float32(inputs):
    h_BxTxD, wte_VxD, targets_BxT, mask_BxT = inputs
    weights_BxT = mask_BxT / mask_BxT.sum()
    loss = lambda h, w: weighted_cross_entropy(h, w, targets_BxT, weights_BxT, 4)  # noqa: E731
    want = jax.grad(loss, argnums=(0, 1))(h_BxTxD, wte_VxD)
    got = jax.grad(loss, argnums=(0, 1))(h_BxTxD.astype(jnp.bfloat16), wte_VxD)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=2e-3)


def test_unchunked_equals_reference(inputs):
    np.testing.assert_allclose(chunked_loss(0)(*inputs), full_logits_loss(*inputs), rtol=1e-6)


def test_bf16_hidden_states_give_float32_chunk_logits(inputs):
    h_BxTxD, wte_VxD, targets_BxT, mask_BxT = inputs
    h16 = h_BxTxD.astype(jnp.bfloat16)
    ce_BxT = token_cross_entropy(h16, wte_VxD, targets_BxT, 4)
    assert ce_BxT.dtype == jnp.float32
    np.testing.assert_allclose(ce_BxT, token_cross_entropy(h16, wte_VxD, targets_BxT, 0), rtol=1e-6, atol=1e-6)


def test_lm_loss_through_the_model_is_the_same_chunked_or_not():
    cfg = ModelConfig(vocab_size=64, block_size=24, n_layer=2, n_head=2, n_embd=32, dtype="float32")
    model = GPT(cfg)
    params = init_params(cfg, jax.random.key(0))
    rs = np.random.default_rng(1)
    x_BxT, y_BxT = (jnp.asarray(rs.integers(0, 64, (2, 24)), jnp.int32) for _ in range(2))

    def value_and_grads(chunk):
        return jax.jit(jax.value_and_grad(lambda p: lm_loss(model, p, x_BxT, y_BxT, loss_chunk=chunk)))(params)

    ref_loss, ref_grads = value_and_grads(0)
    logits_BxTxV, _ = model.apply({"params": params}, x_BxT)
    np.testing.assert_allclose(ref_loss, optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, y_BxT).mean(),
                               rtol=1e-6)
    loss, grads = value_and_grads(10)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7), grads, ref_grads)
