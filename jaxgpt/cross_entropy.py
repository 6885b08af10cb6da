"""Next-token cross-entropy through the tied LM head, optionally a chunk of positions at a time.

The full logits of a batch are B x T x V float32 (GPT-2 124M at batch 8, block 1024: 1.6 GB, and as much
again for their gradient). With `chunk` > 0 the head, log-softmax and target pick run over T in chunks
inside a `lax.map` whose body is rematerialised, so the forward keeps no logits and the backward recomputes
one chunk at a time: at most B x chunk x V float32 logits are alive. Logits are float32 in both modes.

Shape letters as in model.py; C is the chunk length, N the number of chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.model import lm_logits


def _cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return logz_BxT - target_BxT


def token_cross_entropy(h_BxTxD: jax.Array, wte_VxD: jax.Array, targets_BxT: jax.Array, chunk: int = 0) -> jax.Array:
    """BxT float32 cross-entropy of each target under logits h . wte^T; chunk 0 computes all logits at once."""
    B, T, D = h_BxTxD.shape
    if chunk <= 0 or chunk >= T:
        return _cross_entropy(lm_logits(h_BxTxD, wte_VxD), targets_BxT)
    N = -(-T // chunk)
    pad = N * chunk - T  # a ragged last chunk is padded; its padded positions are dropped below
    h_NxBxCxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, N, chunk, D).swapaxes(0, 1)
    targets_NxBxC = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(B, N, chunk).swapaxes(0, 1)

    # Remat: the backward pass recomputes each chunk's logits instead of the forward saving all of them.
    @jax.checkpoint
    def one_chunk(h_BxCxD, targets_BxC):
        return _cross_entropy(lm_logits(h_BxCxD, wte_VxD), targets_BxC)

    ce_NxBxC = jax.lax.map(lambda args: one_chunk(*args), (h_NxBxCxD, targets_NxBxC))
    return ce_NxBxC.swapaxes(0, 1).reshape(B, N * chunk)[:, :T]
