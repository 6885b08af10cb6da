"""The config of an RL or DPO run: the pretrained run's model/data/seed, then the YAML, then overrides."""

from __future__ import annotations


from jaxgpt import config as config_lib
from jaxgpt import rundir
from jaxgpt.config import RLRunConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.train.loop import check_train_config

# Model keys an RL run may change (compute settings only); the architecture comes from the pretrained run.
MODEL_KEYS = ("dtype", "remat", "attention")


def load_config(path: str | None, overrides: list[str], init_from: str | None = None,
                extra: dict[str, str] | None = None) -> RLRunConfig:
    """Config for `jaxgpt rl` / `jaxgpt dpo`; `extra` (CLI flags such as --data) wins over both."""
    flat = config_lib.read_yaml(path) if path else {}
    flat.update(config_lib.parse_overrides(list(overrides)))
    flat.update(extra or {})
    init_from = init_from or flat.get("rl.init_from", "")
    base = rundir.pretrained_base(init_from, flat, MODEL_KEYS, "rl")
    # No dropout: the clipped ratio compares log-probs of the same params, which dropout noise would blur.
    base.update({"model.dropout": 0.0, "model.lora_rank": 0, "model.scan_layers": False})
    return config_lib.build({**base, **flat, "rl.init_from": str(init_from)}, RLRunConfig)


def check(cfg: RLRunConfig) -> None:
    rl, tc = cfg.rl, cfg.train
    if rl.algorithm not in ("grpo", "dpo"):
        raise JaxgptError(f"rl.algorithm must be grpo or dpo, got '{rl.algorithm}'")
    check_train_config(tc)
    if rl.algorithm == "dpo":
        if not rl.data:
            raise JaxgptError("DPO needs preference pairs: pass --data PAIRS.jsonl or set rl.data")
        if not rl.dpo_beta > 0:
            raise JaxgptError(f"rl.dpo_beta must be positive, got {rl.dpo_beta}")
        return
    for name in ("prompts_per_step", "group_size", "max_new_tokens", "eval_prompts", "eval_samples", "ppo_epochs",
                 "minibatches"):
        if getattr(rl, name) <= 0:
            raise JaxgptError(f"rl.{name} must be positive, got {getattr(rl, name)}")
    if rl.group_size < 2:
        raise JaxgptError("rl.group_size must be at least 2: advantages are relative to the group")
    if (rl.prompts_per_step * rl.group_size) % rl.minibatches:
        raise JaxgptError(f"rl.prompts_per_step x rl.group_size ({rl.prompts_per_step * rl.group_size}) must be "
                          f"divisible by rl.minibatches ({rl.minibatches})")
    if rl.kl_estimator not in ("exact", "k3"):
        raise JaxgptError(f"rl.kl_estimator must be exact or k3, got '{rl.kl_estimator}'")
    if rl.kl_coef < 0 or rl.clip_eps <= 0 or rl.adv_eps <= 0 or rl.temperature <= 0:
        raise JaxgptError("rl.kl_coef must be >= 0 and rl.clip_eps, rl.adv_eps, rl.temperature positive")
    if rl.max_new_tokens >= cfg.model.block_size:
        raise JaxgptError(f"rl.max_new_tokens ({rl.max_new_tokens}) must be below the model's context "
                          f"({cfg.model.block_size}); lower rl.max_new_tokens")
