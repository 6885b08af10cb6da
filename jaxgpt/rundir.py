"""A run dir holds everything a run needs to resume or serve: config.json, tokenizer/, checkpoints/."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxgpt import config as config_lib
from jaxgpt import files
from jaxgpt.config import Config, FinetuneRunConfig
from jaxgpt.data import corpus, tokenizers
from jaxgpt.errors import JaxgptError

LANGUAGE_MODEL, CLASSIFIER = "language model", "classifier"
# What takes each kind of run dir, named when a run dir of the wrong kind is given.
_TAKEN_BY = {
    LANGUAGE_MODEL: "generate, chat, perplexity, export, convert, serve, and finetune/rl/dpo --init-from "
                    "(Python: jaxgpt.load)",
    CLASSIFIER: "evaluate, and rl.reward=classifier:RUN_DIR (Python: jaxgpt.load_classifier)",
}

# Keys that may change when a run is resumed; everything else must match what it was trained with.
RESUMABLE_SECTIONS = ("train", "mesh")


def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / "config.json"


def resolve_config(run_dir: Path, new: Config | None) -> Config:
    """The config to run with: the new one, checked against what the run dir was started with."""
    saved_file = config_path(run_dir)
    if not saved_file.is_file():
        if new is None:
            raise JaxgptError(f"'{run_dir}' is not a jaxgpt run dir (no config.json); train one first with "
                              f"`jaxgpt train --config FILE --run-dir {run_dir}`")
        return new
    saved = config_lib.load_json(saved_file)
    if new is None:
        return saved
    for section in ("model", "data"):
        old_s, new_s = getattr(saved, section), getattr(new, section)
        for f in dataclasses.fields(old_s):
            a, b = getattr(old_s, f.name), getattr(new_s, f.name)
            if a != b and not (section == "model" and f.name in ("vocab_size", "preset")):
                raise JaxgptError(f"run dir '{run_dir}' was started with {section}.{f.name}={a!r}, not {b!r}; "
                                  "use the same value to resume or a new --run-dir")
    if new.seed != saved.seed:
        raise JaxgptError(f"run dir '{run_dir}' was started with seed={saved.seed}; resume with the same seed")
    return dataclasses.replace(new, model=saved.model)


# Written beside a tokenizer jaxgpt fitted: the data settings it was fitted for.
FITTED_FOR = "fitted_for.json"


def kind(cfg: Config) -> str:
    """A run dir's kind: a classifier fine-tune, or a language model (pretrained, SFT, RL, DPO)."""
    return CLASSIFIER if isinstance(cfg, FinetuneRunConfig) and cfg.finetune.task == "classify" else LANGUAGE_MODEL


def check_kind(run_dir: Path, cfg: Config, wanted: str) -> None:
    """One line naming what the run dir is and what takes it, when it is not a `wanted` run dir."""
    got = kind(cfg)
    if got != wanted:
        raise JaxgptError(f"'{run_dir}' is a {got} run dir, not a {wanted}; it is taken by {_TAKEN_BY[got]}")


def tokenizer_for(cfg: Config, run_dir: Path) -> tokenizers.Tokenizer:
    """The run's tokenizer: loaded from the run dir, or built from the corpus and saved there.

    A tokenizer left by a start that failed before its first step (no config.json yet) is reused only if
    it was fitted for the same data settings; otherwise it is fitted again.
    """
    folder = Path(run_dir) / "tokenizer"
    fitted_for = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"}
    if (folder / "tokenizer.json").is_file():
        marker = folder / FITTED_FOR
        stale = (not config_path(run_dir).is_file() and marker.is_file()
                 and files.read_json(marker) != fitted_for)
        if not stale:
            return tokenizers.load(folder)
    # A char vocabulary must cover validation text too; learned vocabularies see training text only.
    splits = ("train", "val") if cfg.data.tokenizer == "char" else ("train",)
    tok = tokenizers.train(cfg.data.tokenizer, corpus.tokenizer_texts(cfg.data, splits), cfg.data.vocab_size)
    tok.save(folder)
    files.atomic_write_json(folder / FITTED_FOR, fitted_for)
    return tok


def with_vocab(cfg: Config, tok: tokenizers.Tokenizer) -> Config:
    """Set model.vocab_size from the tokenizer (rounded up to a multiple of 64 for fast matmuls)."""
    if cfg.model.vocab_size == 0:
        return config_lib.replace(cfg, **{"model.vocab_size": -(-tok.vocab_size // 64) * 64})
    if cfg.model.vocab_size < tok.vocab_size:
        raise JaxgptError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"({tok.vocab_size}); set model.vocab_size=0 to size it from the tokenizer")
    return cfg


def pretrained_base(init_from: str, flat: dict, model_keys: tuple[str, ...], who: str) -> dict:
    """The pretrained run's model/data/seed keys, for a run that starts from it (fine-tune, RL, DPO).

    `flat` (the new run's own keys) may change only `model_keys` of the model: the architecture is fixed.
    """
    if not init_from:
        raise JaxgptError(f"pass --init-from RUN_DIR (a pretrained run) or set {who}.init_from")
    saved = config_path(Path(init_from))
    if not saved.is_file():
        raise JaxgptError(f"--init-from '{init_from}' is not a jaxgpt run dir (no config.json)")
    base = config_lib.read_json_flat(saved)
    if base.get("finetune.task") == "classify":
        raise JaxgptError(f"--init-from '{init_from}' is a {CLASSIFIER} run dir, not a {LANGUAGE_MODEL}; it is "
                          f"taken by {_TAKEN_BY[CLASSIFIER]}")
    for key in flat:
        if key.startswith("model.") and key.split(".", 1)[1] not in model_keys:
            raise JaxgptError(f"'{key}' comes from the pretrained run; this run may set model."
                              f"{{{', '.join(model_keys)}}}")
    return {k: v for k, v in base.items() if k.split(".")[0] in ("model", "data", "seed")}
