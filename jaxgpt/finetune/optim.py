"""Which parameters train, when, and how fast: freezing, gradual unfreezing, discriminative LRs, LoRA.

Every parameter gets a depth: the classifier head 0, ln_f and the top block 1, ..., block 0 n_layer,
embeddings n_layer + 1. Parameters of one depth share an AdamW whose learning rate is
`schedule(step) * layer_lr_decay**depth`, gated to 0 until that depth's unfreezing step; frozen ones go
to `optax.set_to_zero` through `optax.multi_transform`. A zero learning rate gives an update of exactly
0, so a gated parameter stays bit-identical, and one compiled step serves the whole schedule.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import FinetuneConfig, ModelConfig, TrainConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.train.optimizer import decay_mask, schedule

FROZEN = "frozen"
GROUPS = ("embed", "blocks", "attn", "mlp", "ln", "head", "lora")  # besides h_N and any module name


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def depth_of(keys: tuple[str, ...], n_layer: int) -> int:
    """('gpt', 'h_3', ...) -> n_layer - 3; head 0; ln_f 1; embeddings n_layer + 1."""
    if keys[0] == "head":
        return 0
    name = keys[1]
    if name == "ln_f":
        return 1
    if name.startswith("h_"):
        return n_layer - int(name[2:])
    if name in ("wte", "wpe"):
        return n_layer + 1
    raise JaxgptError("gradual unfreezing and layer_lr_decay need unrolled layers; set model.scan_layers=false")


def _matches(item: str, keys: tuple[str, ...]) -> bool:
    if item == "embed":
        return keys[1:2] in (("wte",), ("wpe",))
    if item == "blocks":
        return keys[0] == "gpt" and (keys[1].startswith("h_") or keys[1] == "h")
    if item == "ln":
        return any(k.startswith("ln_") for k in keys)
    if item == "head":
        return keys[0] == "head"
    if item == "lora":
        return keys[-1] in ("lora_A", "lora_B")
    return item in keys or "/".join(keys[1:]).startswith(item)


def parse_freeze(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def trainable_tree(params, model_cfg: ModelConfig, ft: FinetuneConfig):
    """True for parameters that ever train: all but `finetune.freeze`; with LoRA only adapters and head."""
    items = parse_freeze(ft.freeze)
    flat = [_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for item in items:
        if not any(_matches(item, k) for k in flat):
            raise JaxgptError(f"finetune.freeze item '{item}' matches no parameter; use {', '.join(GROUPS)}, "
                              "h_N or a module name such as attn/c_attn")

    def trainable(path, _):
        keys = _keys(path)
        if model_cfg.lora_rank and keys[0] == "gpt" and keys[-1] not in ("lora_A", "lora_B"):
            return False
        return not any(_matches(item, keys) for item in items)

    return jax.tree_util.tree_map_with_path(trainable, params)


def unfreeze_step(depth: int, n_layer: int, ft: FinetuneConfig) -> int:
    """The step from which parameters of `depth` train: head at 0, then `unfreeze_blocks` blocks per
    stage, embeddings one stage after the last block."""
    if ft.unfreeze_every <= 0 or depth == 0:
        return 0
    stage = math.ceil(min(depth, n_layer) / ft.unfreeze_blocks) + (depth > n_layer)
    return stage * ft.unfreeze_every


def labels_tree(params, trainable, model_cfg: ModelConfig, ft: FinetuneConfig):
    staged = ft.unfreeze_every > 0 or ft.layer_lr_decay != 1.0

    def label(path, _, is_trainable):
        if not is_trainable:
            return FROZEN
        return f"depth_{depth_of(_keys(path), model_cfg.n_layer)}" if staged else "all"

    return jax.tree_util.tree_map_with_path(label, params, trainable)


def make_optimizer(train_cfg: TrainConfig, model_cfg: ModelConfig, ft: FinetuneConfig, params, trainable):
    """(optax transformation, the base LR schedule) for these params."""
    if ft.unfreeze_every < 0 or ft.unfreeze_blocks <= 0 or ft.layer_lr_decay <= 0:
        raise JaxgptError("finetune.unfreeze_every must be >= 0, unfreeze_blocks and layer_lr_decay > 0")
    base = schedule(train_cfg)
    labels = labels_tree(params, trainable, model_cfg, ft)
    names = set(jax.tree.leaves(labels))

    def adamw(depth: int | None):
        if depth is None:
            lr = base
        else:
            start, factor = unfreeze_step(depth, model_cfg.n_layer, ft), ft.layer_lr_decay ** depth
            lr = lambda step, start=start, factor=factor: base(step) * factor * (step >= start)  # noqa: E731
        return optax.adamw(lr, b1=train_cfg.beta1, b2=train_cfg.beta2, weight_decay=train_cfg.weight_decay,
                           mask=decay_mask)

    transforms: dict[str, Any] = {FROZEN: optax.set_to_zero()}
    for name in names - {FROZEN}:
        transforms[name] = adamw(None if name == "all" else int(name.split("_")[1]))
    clip = optax.clip_by_global_norm(train_cfg.grad_clip if train_cfg.grad_clip > 0 else float("inf"))
    return optax.chain(clip, optax.multi_transform(transforms, labels)), base


def zero_frozen(grads, trainable):
    # Permanently frozen gradients are replaced by zeros before clipping, so they neither count in the
    # global norm nor cost a weight-gradient matmul (XLA drops the unused computation).
    return jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)


def count(params, trainable) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    sizes = jax.tree.map(lambda p, t: (p.size * t, p.size), params, trainable)
    leaves = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
    return sum(a for a, _ in leaves), sum(b for _, b in leaves)
