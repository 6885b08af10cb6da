"""GRPO: policy gradient on the model's own samples with group-relative advantages.

For each prompt, G completions are sampled; completion i of a group gets advantage
A_i = (r_i - mean_group) / (std_group + eps), shared by all its tokens. The loss per completion token is
the PPO clipped surrogate, -min(rho A, clip(rho, 1 - e, 1 + e) A) with rho = pi(token) / pi_old(token)
(pi_old: the policy that sampled, its log-probs stored before any update), plus kl_coef times a KL to the
frozen reference model. Loss terms are averaged over all completion tokens of a minibatch (tokens up to
and including end-of-text; prompt and padding slots have mask 0).

KL estimators (rl.kl_estimator): `exact` sums p log(p / p_ref) over the whole vocabulary at every completion
slot (no sampling noise; zero, with zero gradient, when the policy equals the reference); `k3` is
Schulman's per-sampled-token estimator exp(q - p) - (q - p) - 1 of log-probs p (policy), q (reference).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import ModelConfig, RLConfig
from jaxgpt.rl.policy import completion_logprobs, gather


def group_advantages(rewards_NxG: np.ndarray, eps: float) -> np.ndarray:
    """(r - group mean) / (group std + eps) for N prompts of G samples (population std)."""
    r = np.asarray(rewards_NxG, np.float64)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)).astype(np.float32)


def clipped_surrogate(logp_BxN, old_logp_BxN, adv_B, clip_eps: float):
    """Per-token PPO objective as a loss, -min(rho A, clip(rho) A), and where clipping is active."""
    ratio_BxN = jnp.exp(logp_BxN - old_logp_BxN)
    adv_Bx1 = adv_B[:, None]
    unclipped_BxN = ratio_BxN * adv_Bx1
    clipped_BxN = jnp.clip(ratio_BxN, 1 - clip_eps, 1 + clip_eps) * adv_Bx1
    loss_BxN = -jnp.minimum(unclipped_BxN, clipped_BxN)
    is_clipped_BxN = clipped_BxN < unclipped_BxN  # the clip bound, not the ratio, sets the objective here
    return loss_BxN, ratio_BxN, is_clipped_BxN


def token_kl(logp_BxNxV, ref_logp_BxNxV, tokens_BxN, estimator: str) -> jax.Array:
    """BxN KL(policy || reference) per completion slot."""
    if estimator == "exact":
        return jnp.sum(jnp.exp(logp_BxNxV) * (logp_BxNxV - ref_logp_BxNxV), axis=-1)
    log_ratio_BxN = gather(ref_logp_BxNxV, tokens_BxN) - gather(logp_BxNxV, tokens_BxN)
    return jnp.exp(log_ratio_BxN) - log_ratio_BxN - 1


def rl_loss(model_cfg: ModelConfig, rl: RLConfig, n_vocab: int, P: int, params, ref_logp_BxNxV, batch):
    """(loss, metrics) for one minibatch; `batch` holds tokens_BxL, start_B, mask_BxN, old_logp_BxN, adv_B."""
    tokens_BxN = batch["tokens_BxL"][:, P:]
    mask_BxN = batch["mask_BxN"]
    n_tokens = jnp.maximum(mask_BxN.sum(), 1.0)
    logp_BxNxV = completion_logprobs(model_cfg, params, batch["tokens_BxL"], batch["start_B"], n_vocab, P)
    logp_BxN = gather(logp_BxNxV, tokens_BxN)
    pg_BxN, ratio_BxN, clipped_BxN = clipped_surrogate(logp_BxN, batch["old_logp_BxN"], batch["adv_B"], rl.clip_eps)
    kl_BxN = token_kl(logp_BxNxV, ref_logp_BxNxV, tokens_BxN, rl.kl_estimator)
    mean = lambda x_BxN: jnp.sum(x_BxN * mask_BxN) / n_tokens  # noqa: E731
    pg, kl = mean(pg_BxN), mean(kl_BxN)
    metrics = {"pg_loss": pg, "kl": kl, "clip_frac": mean(clipped_BxN.astype(jnp.float32)),
               "ratio": mean(ratio_BxN), "entropy": mean(-jnp.sum(jnp.exp(logp_BxNxV) * logp_BxNxV, axis=-1))}
    loss = pg + rl.kl_coef * kl
    return loss, {"loss": loss, **metrics}


def make_rl_step(model_cfg: ModelConfig, rl: RLConfig, tx: optax.GradientTransformation, n_vocab: int,
                 P: int) -> Callable:
    """rl_step(state, ref_params, batch, rng) -> (state, metrics): ppo_epochs x minibatches updates in one call.

    The reference log-probs are computed once per call; each epoch visits the rows in a fresh random order.
    """
    E, M = rl.ppo_epochs, rl.minibatches

    def rl_step(state, ref_params, batch, rng):
        B = batch["adv_B"].shape[0]
        ref_logp_BxNxV = jax.lax.stop_gradient(
            completion_logprobs(model_cfg, ref_params, batch["tokens_BxL"], batch["start_B"], n_vocab, P))
        rng = jax.random.fold_in(rng, state["step"])
        order_ExB = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), B) for e in range(E)])
        rows_UxR = order_ExB.reshape(E * M, B // M)  # U = E x M updates of R rows each

        def update(carry, rows_R):
            params, opt_state = carry
            mb = jax.tree.map(lambda a: a[rows_R], batch)
            grad_fn = jax.grad(lambda p: rl_loss(model_cfg, rl, n_vocab, P, p, ref_logp_BxNxV[rows_R], mb),
                               has_aux=True)
            grads, metrics = grad_fn(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            metrics["grad_norm"] = optax.tree.norm(grads)
            return (optax.apply_updates(params, updates), opt_state), metrics

        (params, opt_state), metrics_U = jax.lax.scan(update, (state["params"], state["opt_state"]), rows_UxR)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, jax.tree.map(jnp.mean, metrics_U)

    return rl_step
