"""AdamW with decoupled weight decay on matrices only, warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

import jax
import optax

from jaxgpt.config import TrainConfig

_NO_DECAY = ("bias", "scale")  # biases and LayerNorm gains


def decay_mask(params):
    """True for weights that get weight decay: every leaf except biases and LayerNorm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) not in _NO_DECAY, params)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    # Clipping is always in the chain (inf = off) so the optimizer state keeps one structure and a run
    # can be resumed with a different train.grad_clip.
    clip = optax.clip_by_global_norm(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    adamw = optax.adamw(schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw)
