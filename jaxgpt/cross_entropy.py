"""Next-token cross-entropy through the tied LM head, optionally a chunk of positions at a time.

The full logits of a batch are B x T x V float32 (GPT-2 124M at batch 8, block 1024: 1.6 GB, and as much
again for their gradient). With `chunk` > 0 the head, log-softmax and target pick run over T in chunks, so at
most B x chunk x V float32 logits are alive. Logits are float32 in both modes.

The training loss is `weighted_cross_entropy`: a weighted sum over tokens whose gradient is fused into the
forward pass. Each chunk's logit gradient (softmax - one-hot, times the token's weight) is known as soon as
its logits are, so the forward pass also takes the hidden-state and embedding gradients from it and the
backward pass only scales them: three LM-head matmuls per step instead of four (forward, a recomputed
forward, two backward), and no logits kept.

Shape letters as in model.py; C is the chunk length, N the number of chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt.model import lm_logits


def _cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return logz_BxT - target_BxT


def token_cross_entropy(h_BxTxD: jax.Array, wte_VxD: jax.Array, targets_BxT: jax.Array, chunk: int = 0) -> jax.Array:
    """BxT float32 cross-entropy of each target under logits h . wte^T; chunk 0 computes all logits at once."""
    T = h_BxTxD.shape[1]
    if chunk <= 0 or chunk >= T:
        return _cross_entropy(lm_logits(h_BxTxD, wte_VxD), targets_BxT)

    # Remat: the backward pass recomputes each chunk's logits instead of the forward saving all of them.
    @jax.checkpoint
    def one_chunk(h_BxCxD, targets_BxC):
        return _cross_entropy(lm_logits(h_BxCxD, wte_VxD), targets_BxC)

    ce_NxBxC = jax.lax.map(lambda args: one_chunk(*args), (_chunks(h_BxTxD, chunk), _chunks(targets_BxT, chunk)))
    return _unchunk(ce_NxBxC, T)


def _chunks(x_BxT_, chunk: int) -> jax.Array:
    """B x T x ... -> N x B x chunk x ..., the last chunk zero-padded."""
    B, T = x_BxT_.shape[:2]
    N = -(-T // chunk)
    pad = [(0, 0), (0, N * chunk - T)] + [(0, 0)] * (x_BxT_.ndim - 2)
    return jnp.pad(x_BxT_, pad).reshape(B, N, chunk, *x_BxT_.shape[2:]).swapaxes(0, 1)


def _unchunk(x_NxBxC_, T: int) -> jax.Array:
    """N x B x chunk x ... -> B x T x ...: `_chunks` undone, the padding dropped."""
    N, B, C = x_NxBxC_.shape[:3]
    return x_NxBxC_.swapaxes(0, 1).reshape(B, N * C, *x_NxBxC_.shape[3:])[:, :T]


def weighted_cross_entropy(h_BxTxD: jax.Array, wte_VxD: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
                           chunk: int = 0) -> jax.Array:
    """sum(weights * cross-entropy) in float32 (weights 1/(B*T): the mean; a mask over its sum: a masked mean).
    With chunk > 0 the gradients of h and wte are computed in the forward pass, a chunk at a time."""
    T = h_BxTxD.shape[1]
    if chunk <= 0 or chunk >= T:
        return (token_cross_entropy(h_BxTxD, wte_VxD, targets_BxT) * weights_BxT).sum()
    return _fused_weighted_ce(h_BxTxD, wte_VxD, targets_BxT, weights_BxT.astype(jnp.float32), chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_weighted_ce(h_BxTxD, wte_VxD, targets_BxT, weights_BxT, chunk):
    # Without differentiation: chunked logits, nothing kept.
    return (token_cross_entropy(h_BxTxD, wte_VxD, targets_BxT, chunk) * weights_BxT).sum()


def _fused_weighted_ce_fwd(h_BxTxD, wte_VxD, targets_BxT, weights_BxT, chunk):
    B, T, D = h_BxTxD.shape
    V = wte_VxD.shape[0]
    wte_c = wte_VxD.astype(h_BxTxD.dtype)

    def one_chunk(dwte_VxD, inputs):
        h_BxCxD, targets_BxC, weights_BxC = inputs
        # One row axis (R = B x C): XLA's CPU dots contract a single row axis without a transposed copy.
        h_RxD, targets_R, weights_R = h_BxCxD.reshape(-1, D), targets_BxC.reshape(-1), weights_BxC.reshape(-1)
        logits_RxV = jnp.einsum("rd,vd->rv", h_RxD, wte_c, preferred_element_type=jnp.float32)
        logz_R = jax.nn.logsumexp(logits_RxV, axis=-1)
        target_R = jnp.take_along_axis(logits_RxV, targets_R[:, None], axis=-1)[:, 0]
        # d(weight * ce)/dlogits = weight * (softmax - one-hot); padded positions have weight 0.
        onehot_RxV = jnp.arange(V) == targets_R[:, None]
        dlogits_RxV = (jnp.exp(logits_RxV - logz_R[:, None]) - onehot_RxV) * weights_R[:, None]
        dlogits_RxV = dlogits_RxV.astype(h_RxD.dtype)  # bf16 matmuls with f32 accumulation in bf16
        dh_RxD = jnp.einsum("rv,vd->rd", dlogits_RxV, wte_c, preferred_element_type=jnp.float32)
        dwte_VxD = dwte_VxD + jnp.einsum("rv,rd->vd", dlogits_RxV, h_RxD, preferred_element_type=jnp.float32)
        return dwte_VxD, ((logz_R - target_R).reshape(B, chunk), dh_RxD.reshape(B, chunk, D))

    inputs = (_chunks(h_BxTxD, chunk), _chunks(targets_BxT, chunk), _chunks(weights_BxT, chunk))
    dwte_VxD, (ce_NxBxC, dh_NxBxCxD) = jax.lax.scan(one_chunk, jnp.zeros((V, D), jnp.float32), inputs)
    ce_BxT, dh_BxTxD = _unchunk(ce_NxBxC, T), _unchunk(dh_NxBxCxD, T)
    residuals = (ce_BxT, dh_BxTxD.astype(h_BxTxD.dtype), dwte_VxD.astype(wte_VxD.dtype))
    return (ce_BxT * weights_BxT).sum(), residuals


def _fused_weighted_ce_bwd(chunk, residuals, g):
    ce_BxT, dh_BxTxD, dwte_VxD = residuals  # the gradients of the sum; g scales them
    return (g * dh_BxTxD).astype(dh_BxTxD.dtype), (g * dwte_VxD).astype(dwte_VxD.dtype), None, g * ce_BxT


_fused_weighted_ce.defvjp(_fused_weighted_ce_fwd, _fused_weighted_ce_bwd)
