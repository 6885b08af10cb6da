"""Acquisition: how worth labelling each pool example is, and which batch of them to ask for.

Every score is "higher = ask for this label first". The uncertainty scores read NxC class
probabilities; BALD reads TxNxC probabilities from T Monte Carlo dropout passes. `make_pool_scorer`
puts the model pass and the score in one jitted function over a batch, so scoring the pool is one
compiled program per length bucket (the T dropout passes are vmapped inside it).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.finetune.batches import Encoded, eval_batches
from jaxgpt.finetune.heads import pooled_hidden

STRATEGIES = ("random", "least_confidence", "margin", "entropy", "bald")


def least_confidence(probs_NxC):
    """1 - the top class probability."""
    return 1.0 - jnp.max(probs_NxC, axis=-1)


def margin(probs_NxC):
    """1 - (top probability - runner-up): a near tie between two classes scores close to 1."""
    top2_Nx2 = jax.lax.top_k(probs_NxC, 2)[0]
    return 1.0 - (top2_Nx2[..., 0] - top2_Nx2[..., 1])


def entropy(probs_NxC):
    """Predictive entropy in nats (0 log 0 = 0)."""
    return -jnp.sum(jax.scipy.special.xlogy(probs_NxC, probs_NxC), axis=-1)


def bald(probs_TxNxC):
    """Mutual information between the label and the weights: H[mean_t p_t] - mean_t H[p_t]."""
    return entropy(jnp.mean(probs_TxNxC, axis=0)) - jnp.mean(entropy(probs_TxNxC), axis=0)


def random_scores(n: int, seed: int, round_: int) -> np.ndarray:
    """Uniform scores from rng(seed, round): the top k of them is a uniform random sample."""
    return np.random.default_rng([seed, round_, 7]).random(n)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise JaxgptError(f"unknown acquisition strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")


def k_center(emb_NxD: np.ndarray, k: int) -> np.ndarray:
    """Greedy k-center (farthest-first) over the rows, starting from row 0; k distinct row indices."""
    emb_NxD = np.asarray(emb_NxD, np.float64)
    k = min(k, len(emb_NxD))
    chosen = [0]
    dist_N = np.linalg.norm(emb_NxD - emb_NxD[0], axis=1)
    dist_N[0] = -np.inf  # a chosen row is never chosen again, even if every other row coincides with it
    while len(chosen) < k:
        nxt = int(np.argmax(dist_N))  # first of any ties: rows come in score order, so the more uncertain
        chosen.append(nxt)
        dist_N = np.minimum(dist_N, np.linalg.norm(emb_NxD - emb_NxD[nxt], axis=1))
        dist_N[chosen] = -np.inf
    return np.asarray(chosen)


def select(scores_N: np.ndarray, k: int, emb_NxD: np.ndarray | None = None, diversity: int = 1) -> np.ndarray:
    """Positions of the k examples to label: the top-k scores, or with diversity m > 1 a greedy k-center
    pick among the top k*m (so a query is not k near-duplicates of one confusing passage)."""
    order_N = np.argsort(-np.asarray(scores_N), kind="stable")
    if diversity <= 1:
        return order_N[:k]
    if emb_NxD is None:
        raise JaxgptError("the diversity option needs the pool's embeddings")
    candidates = order_N[:k * diversity]
    return candidates[k_center(np.asarray(emb_NxD)[candidates], k)]


def make_pool_scorer(model_cfg: ModelConfig, pooling: str, strategy: str, mc_samples: int) -> Callable:
    """jit((params, batch, rng) -> (score_B, emb_BxD)); `emb` is the deterministic pooled hidden state."""
    check_strategy(strategy)
    if strategy == "bald" and (mc_samples < 2 or model_cfg.dropout <= 0):
        raise JaxgptError(f"BALD needs model.dropout > 0 and active.mc_samples >= 2 (got dropout="
                          f"{model_cfg.dropout}, mc_samples={mc_samples})")
    uncertainty = {"least_confidence": least_confidence, "margin": margin, "entropy": entropy}

    def score(params, batch, rng):
        head = params["head"]
        emb_BxD = pooled_hidden(model_cfg, params, batch["tokens"], batch["start"], pooling)
        if strategy == "bald":
            def probs(key):
                h_BxD = pooled_hidden(model_cfg, params, batch["tokens"], batch["start"], pooling, key)
                return jax.nn.softmax(h_BxD @ head["kernel"] + head["bias"], axis=-1)

            score_B = bald(jax.vmap(probs)(jax.random.split(rng, mc_samples)))
        elif strategy in uncertainty:
            score_B = uncertainty[strategy](jax.nn.softmax(emb_BxD @ head["kernel"] + head["bias"], axis=-1))
        else:
            score_B = jnp.zeros(emb_BxD.shape[:1], jnp.float32)  # random: scores come from random_scores
        return score_B, emb_BxD

    return jax.jit(score)


def score_pool(scorer: Callable, params, enc: Encoded, batch_size: int, max_len: int, pad_id: int,
               rng: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(score_N, emb_NxD) for every encoded example, in example order."""
    score_N, emb_NxD = np.zeros(len(enc), np.float32), None
    for i, (rows, batch) in enumerate(eval_batches(enc, batch_size, max_len, pad_id)):
        s_B, e_BxD = jax.device_get(scorer(params, batch, jax.random.fold_in(rng, i)))
        if emb_NxD is None:
            emb_NxD = np.zeros((len(enc), e_BxD.shape[1]), np.float32)
        score_N[rows], emb_NxD[rows] = s_B[:len(rows)], e_BxD[:len(rows)]
    return score_N, emb_NxD
