"""Typed configuration: YAML file -> dotted `key=value` overrides -> frozen dataclasses.

Order of precedence (later wins): dataclass defaults, `model.preset`, the YAML file, CLI overrides.
One config per command: `Config` (pretraining: the sections every run has), `FinetuneRunConfig` (plus
`finetune`) and `RLRunConfig` (plus `rl`); a run dir's config.json holds its command's sections only.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxgpt.errors import JaxgptError


@dataclass(frozen=True)
class ModelConfig:
    preset: str = ""  # one of PRESETS; sizes below override it when given explicitly
    vocab_size: int = 0  # 0: taken from the tokenizer, rounded up to a multiple of 64
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    dtype: str = "auto"  # activations and matmul inputs; auto: bfloat16 where native (jaxgpt/precision.py)
    param_dtype: str = "float32"
    attention: str = "auto"  # auto (per platform, see jaxgpt/attention.py) | xla | blockwise | cudnn | splash (TPU)
    remat: str = "none"  # none | full | dots_saveable: recompute activations in the backward pass
    scan_layers: bool = False  # nn.scan over blocks: compile time independent of depth
    lora_rank: int = 0  # > 0: LoRA adapters of this rank on the lora_targets projections
    lora_alpha: float = 16.0  # adapter scale is lora_alpha / lora_rank
    lora_targets: str = "c_attn,c_proj"  # comma list of c_attn, c_proj, c_fc or attn/c_proj, mlp/c_proj


@dataclass(frozen=True)
class DataConfig:
    source: str = "shakespeare"  # shakespeare | file:GLOB (or a plain path/glob) | tfds:NAME[/CONFIG]
    tokenizer: str = "sentencepiece"  # char | sentencepiece | gpt2
    vocab_size: int = 8192  # for sentencepiece
    val_fraction: float = 0.1  # share of documents held out for validation
    text_field: str = "text"  # for tfds sources
    tfds_data_dir: str = ""  # for tfds sources; empty: the TFDS default
    cache_dir: str = "~/.cache/jaxgpt"
    max_documents: int = 0  # 0: all; caps large TFDS sources


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16  # global batch, in sequences
    grad_accum: int = 1  # micro-batches per step, inside the jitted step
    loss_chunk: int = 128  # positions per chunk of the LM-head loss (jaxgpt/cross_entropy.py); 0: all at once
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 8
    save_every: int = 500
    log_every: int = 10
    progress: bool = True  # tqdm bar


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning a pretrained run on a labelled task (`jaxgpt finetune`); optimizer settings are `train.*`."""

    task: str = ""  # classify | sft; empty: not a fine-tune run
    init_from: str = ""  # pretrained run dir (its model, tokenizer and best params)
    from_scratch: bool = False  # same architecture and tokenizer, random init: the baseline
    source: str = "shakespeare_genre"  # shakespeare_genre | PATH.jsonl | PATH.csv | tfds:NAME[/CONFIG]
    val_source: str = ""  # local file; empty: the dataset's validation split, else carved from train
    test_source: str = ""  # local file; empty: the dataset's test split
    val_fraction: float = 0.1  # share of train carved out when there is no validation split
    text_field: str = ""  # empty: the format's default (text/label, prompt/response, messages)
    label_field: str = ""
    prompt_field: str = ""
    response_field: str = ""
    labels: str = ""  # comma list fixing classes and order; empty: sorted labels seen in train
    tfds_data_dir: str = ""
    max_examples: int = 0  # 0: all; caps each split
    passage_chars: int = 400  # shakespeare_genre: characters per passage
    passages_per_play: int = 60  # shakespeare_genre: passages sampled from each play
    max_len: int = 0  # tokens per example; 0: model.block_size
    pooling: str = "last"  # classify: last (last non-pad token) | mean
    class_weights: str = ""  # "" | balanced | comma list, one per class
    metric: str = ""  # accuracy | macro_f1 | loss | exact_match | rouge_l; empty: macro_f1 / loss
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    min_delta: float = 0.0  # smallest change that counts as an improvement
    plateau_factor: float = 0.0  # in (0, 1): reduce-on-plateau multiplies the LR by it
    plateau_patience: int = 2  # evaluations without val-loss improvement before a reduction
    freeze: str = ""  # comma list of groups kept fixed: embed, blocks, h_N, attn, mlp, ln, head
    unfreeze_every: int = 0  # > 0: gradual unfreezing, head first, then unfreeze_blocks more every N steps
    unfreeze_blocks: int = 1
    layer_lr_decay: float = 1.0  # discriminative LRs: lr * decay**depth (head 0, top block 1, ...)
    gen_examples: int = 32  # sft: validation examples decoded greedily for exact match / ROUGE-L
    max_new_tokens: int = 64


@dataclass(frozen=True)
class RLConfig:
    """RL fine-tuning (`jaxgpt rl`, GRPO) and preference tuning (`jaxgpt dpo`); optimizer settings are `train.*`."""

    algorithm: str = "grpo"  # grpo | dpo
    init_from: str = ""  # pretrained run dir: the initial policy and the frozen reference
    reward: str = "syllables"  # syllables | target_word | rhyme | module:function | classifier:RUN_DIR
    reward_label: str = ""  # classifier reward: the label whose probability is the reward
    target_word: str = "love"  # target_word reward
    syllables: int = 10  # syllables reward: the target syllables per line
    prompts: str = "shakespeare"  # shakespeare | PATH (.txt one prompt a line, \n for newline; .jsonl "prompt")
    eval_prompts: int = 32  # held-out prompts (never trained on) for the before/after reward
    eval_samples: int = 2  # samples per held-out prompt
    prompts_per_step: int = 8
    group_size: int = 8  # G samples per prompt; advantages are relative to the group
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling temperature; logprobs and the KL are of the T=1 policy
    kl_coef: float = 0.05  # beta of the KL penalty to the reference
    kl_estimator: str = "exact"  # exact (full-vocabulary KL per token) | k3 (Schulman's estimator)
    clip_eps: float = 0.2  # PPO ratio clipping
    adv_eps: float = 1e-4  # advantage = (r - mean) / (std + adv_eps)
    ppo_epochs: int = 1  # passes over each sampled batch
    minibatches: int = 2  # optimizer updates per pass
    data: str = ""  # dpo: JSONL of {"prompt", "chosen", "rejected"}
    dpo_beta: float = 0.1
    val_fraction: float = 0.1  # dpo: share of pairs held out (when there are at least 10)


@dataclass(frozen=True)
class Config:
    """`jaxgpt train`; the other commands' configs add their own section to these."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    seed: int = 0


@dataclass(frozen=True)
class FinetuneRunConfig(Config):
    """`jaxgpt finetune` (and each round of `jaxgpt active`)."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass(frozen=True)
class RLRunConfig(Config):
    """`jaxgpt rl` and `jaxgpt dpo`."""

    rl: RLConfig = field(default_factory=RLConfig)


# The section each command adds, and the command that takes it.
COMMAND_SECTIONS = {"finetune": "jaxgpt finetune / jaxgpt active", "rl": "jaxgpt rl / jaxgpt dpo"}


# GPT-2 family sizes; the small ones fit a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50304),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50304),
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. `train.steps`."""
    keys = []
    hints = typing.get_type_hints(cls)
    for name in _fields(cls):
        if dataclasses.is_dataclass(hints[name]):
            keys += valid_keys(hints[name], f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str, keys: list[str]) -> JaxgptError:
    section = key.split(".", 1)[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    in_section = [k for k in keys if k.startswith(section + ".")]
    sections = sorted({k.split(".", 1)[0] for k in keys if "." in k})
    if section in COMMAND_SECTIONS and not in_section:
        hint = f"; '{section}.*' keys belong to `{COMMAND_SECTIONS[section]}`, this command takes {', '.join(sections)}"
    elif close:
        hint = f"; did you mean '{close[0]}'?"
    elif in_section:
        hint = f"; keys of '{section}': {', '.join(k.split('.', 1)[1] for k in in_section)}"
    else:
        hint = f"; config sections are {', '.join(sections)} (plus 'seed')"
    return JaxgptError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, or say which key got what."""
    want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[typ]
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)  # CLI strings: "3" -> 3, "true" -> True, "1e-3" -> 0.001
        except yaml.YAMLError:
            pass
        if typ is float and isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise JaxgptError(f"config key '{key}' expects {want}, got {value!r}")
    return value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    flat = {}
    for pair in pairs:
        if "=" not in pair:
            raise JaxgptError(f"override '{pair}' is not of the form key=value (e.g. train.steps=100)")
        key, value = pair.split("=", 1)
        flat[key.strip()] = value
    return flat


def build(flat: dict[str, Any], cls: type = Config, prefix: str = ""):
    """A `cls` config from a flat {`prefix`dotted.key: value} dict; `model.preset` applies before model keys.

    `cls` is a command's config (Config, FinetuneRunConfig, RLRunConfig) or any dataclass of scalars and
    sections, such as `jaxgpt active`'s settings (prefix 'active.').
    """
    keys = valid_keys(cls, prefix)
    for key in flat:
        if key not in keys:
            raise _unknown_key(key, keys)
    return _make(cls, flat, prefix)


def _make(cls: type, flat: dict[str, Any], prefix: str):
    values: dict[str, Any] = {}
    preset = flat.get(prefix + "preset", "") if cls is ModelConfig else ""
    if preset:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, PRESETS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise JaxgptError(f"unknown model.preset '{preset}' (choose from {', '.join(PRESETS)}){hint}")
        values.update(PRESETS[preset])
    hints = typing.get_type_hints(cls)
    for name in _fields(cls):
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _make(hints[name], flat, f"{prefix}{name}.")
        elif prefix + name in flat:
            values[name] = _coerce(prefix + name, flat[prefix + name], hints[name])
    return cls(**values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise JaxgptError(f"config file '{path}' not found; pass an existing YAML file to --config")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise JaxgptError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise JaxgptError(f"config file '{path}' must hold a mapping of sections (model:, data:, train:)")
    return flatten(tree)


def load(path: str | Path | None = None, overrides: list[str] | dict[str, Any] = ()) -> Config:
    """YAML file (optional) + overrides -> Config."""
    flat = read_yaml(path) if path else {}
    flat.update(parse_overrides(overrides) if isinstance(overrides, list | tuple) else dict(overrides))
    return build(flat)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_json(cfg: Config, path: str | Path) -> None:
    from jaxgpt import files

    files.atomic_write_json(path, to_dict(cfg), indent=2)  # a crash never leaves a half-written config


def run_config_class(flat: dict[str, Any]) -> type:
    """The config class of the command that wrote a run dir's (flat) config."""
    return FinetuneRunConfig if flat.get("finetune.task") else RLRunConfig if flat.get("rl.init_from") else Config


def read_json_flat(path: str | Path) -> dict[str, Any]:
    """A run dir's config.json, flat; the sections of other commands that older versions wrote are dropped."""
    from jaxgpt import files

    saved = files.read_json(path, "restore it from a backup, or start a new run dir (the checkpoints alone "
                                  "do not hold the config)")
    if not isinstance(saved, dict):
        raise JaxgptError(f"'{path}' is damaged (not a JSON object); restore it from a backup or start a new run dir")
    flat = flatten(saved)
    own = _fields(run_config_class(flat))
    return {k: v for k, v in flat.items() if k.split(".")[0] in own or k.split(".")[0] not in COMMAND_SECTIONS}


def load_json(path: str | Path) -> Config:
    """A run dir's config, as its command's class."""
    flat = read_json_flat(path)
    return build(flat, run_config_class(flat))


def replace(cfg: Config, **flat: Any) -> Config:
    """A copy with dotted keys replaced, e.g. replace(cfg, **{"model.vocab_size": 8192})."""
    merged = flatten(to_dict(cfg))
    merged.update(flat)
    return build(merged, type(cfg))


def dtype_of(name: str):
    """The jnp dtype of a config name; 'auto' is resolved for this device (jaxgpt.precision)."""
    import jax.numpy as jnp

    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name == "auto":
        from jaxgpt.precision import auto_dtype

        name = auto_dtype()
    if name not in table:
        raise JaxgptError(f"unknown dtype '{name}'; use one of auto, {', '.join(table)}")
    return table[name]

