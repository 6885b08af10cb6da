"""Task heads and losses over the GPT body.

Fine-tune params are {"gpt": GPT params, "head": {"kernel": DxC, "bias": C}} (no head for SFT).
Classification pools the final-LayerNorm hidden states of the real tokens: the last one (rows are
left-padded, so it is at T-1) or their mean. SFT is the LM loss on assistant tokens only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import ModelConfig
from jaxgpt.cross_entropy import weighted_cross_entropy
from jaxgpt.model import GPT

POOLINGS = ("last", "mean")


def init_head(rng: jax.Array, n_embd: int, n_classes: int) -> dict[str, jax.Array]:
    return {"kernel": 0.02 * jax.random.normal(rng, (n_embd, n_classes), jnp.float32),
            "bias": jnp.zeros((n_classes,), jnp.float32)}


def _rngs(rng):
    return None if rng is None else {"dropout": rng}


def pooled_hidden(cfg: ModelConfig, params, tokens_BxT, start_B, pooling: str = "last", rng=None) -> jax.Array:
    """BxD float32 pooled final hidden states (the head's input); dropout on when `rng` is given."""
    h_BxTxD, _ = GPT(cfg).apply({"params": params["gpt"]}, tokens_BxT, start_B=start_B, deterministic=rng is None,
                                rngs=_rngs(rng), return_hidden=True)
    h_BxTxD = h_BxTxD.astype(jnp.float32)
    if pooling == "last":
        return h_BxTxD[:, -1]
    T = tokens_BxT.shape[1]
    real_BxT = (jnp.arange(T)[None, :] >= start_B[:, None]).astype(jnp.float32)
    return (h_BxTxD * real_BxT[..., None]).sum(1) / jnp.maximum(real_BxT.sum(1, keepdims=True), 1.0)


def class_logits(cfg: ModelConfig, params, tokens_BxT, start_B, pooling: str = "last", rng=None) -> jax.Array:
    """BxC float32 logits; dropout on when `rng` is given."""
    pooled_BxD = pooled_hidden(cfg, params, tokens_BxT, start_B, pooling, rng)
    return pooled_BxD @ params["head"]["kernel"] + params["head"]["bias"]


def class_loss(logits_BxC, label_B, weight_B, class_weight_C) -> tuple[jax.Array, jax.Array]:
    """(weighted mean cross-entropy, total weight); filler rows have weight 0."""
    w_B = weight_B * class_weight_C[label_B]
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, label_B)
    total = w_B.sum()
    return (ce_B * w_B).sum() / jnp.maximum(total, 1e-9), total


def sft_token_losses(cfg: ModelConfig, params, batch, rng=None, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropy over assistant target tokens, number of them): pretraining's LM loss
    (jaxgpt/cross_entropy.py) with the mask as weights; `loss_chunk` is train.loss_chunk."""
    h_BxTxD, _ = GPT(cfg).apply({"params": params["gpt"]}, batch["tokens"], start_B=batch["start"],
                                deterministic=rng is None, rngs=_rngs(rng), return_hidden=True)
    mask_BxT = batch["mask"] * batch["weight"][:, None]
    total = weighted_cross_entropy(h_BxTxD, params["gpt"]["wte"], batch["targets"], mask_BxT, loss_chunk)
    return total, mask_BxT.sum()


def task_loss(cfg: ModelConfig, task: str, pooling: str, class_weight_C, params, batch, rng=None,
              loss_chunk: int = 0) -> jax.Array:
    """The scalar training loss for one batch."""
    if task == "classify":
        logits_BxC = class_logits(cfg, params, batch["tokens"], batch["start"], pooling, rng)
        return class_loss(logits_BxC, batch["label"], batch["weight"], class_weight_C)[0]
    total, count = sft_token_losses(cfg, params, batch, rng, loss_chunk)
    return total / jnp.maximum(count, 1.0)
