"""Prompts for RL: training prompts and held-out prompts that are never trained on.

`shakespeare`: the opening of speeches ('SPEAKER:' and the speech's first line) from the bundled plays;
training prompts come from the pretraining split's plays and held-out prompts from its validation plays,
so neither the pretrained model nor the policy has seen the held-out ones. A file: `.jsonl` lines with
a "prompt" field (text, or a dialogue: a list of {role, content} messages ending with the user's, which
the policy answers in its chat template), or any other text file with one prompt per line (`\\n` in a
line stands for a newline); its last `rl.eval_prompts` prompts are held out.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from jaxgpt import conversation
from jaxgpt.config import RLRunConfig
from jaxgpt.errors import JaxgptError


def _speech_openings(text: str) -> list[str]:
    """'SPEAKER:\\nfirst line\\n' for every speech whose first line has at least four words."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines[:-1]):
        first = lines[i + 1].strip()
        if re.fullmatch(r"[A-Z][A-Za-z .,'&-]*:", line) and len(first.split()) >= 4:
            out.append(f"{line}\n{first}\n")
    return out


def shakespeare_prompts(val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) speech openings, split by play as in pretraining."""
    from jaxgpt.config import DataConfig
    from jaxgpt.data import sources

    train, held_out = [], []
    for split, out in (("train", train), ("val", held_out)):
        for _, text in sources.documents(DataConfig(source="shakespeare", val_fraction=val_fraction), split):
            out += _speech_openings(text)
    return train, held_out


def _read_file(path: Path) -> list:
    if not path.is_file():
        raise JaxgptError(f"rl.prompts file '{path}' not found; use 'shakespeare' or a .txt/.jsonl file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxgptError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if isinstance(prompt, list):
                conversation.check_prompt(prompt, f"{path} line {n}")
            elif not isinstance(prompt, str):
                raise JaxgptError(f"{path} line {n}: expected an object with a string 'prompt' field "
                                  "(or a dialogue: a list of {role, content} messages)")
            prompts.append(prompt)
        else:
            prompts.append(line.replace("\\n", "\n"))
    return prompts


def load_prompts(cfg: RLRunConfig) -> tuple[list, list]:
    """(train prompts, held-out prompts) for cfg.rl.prompts; the held-out list has rl.eval_prompts entries."""
    n_eval = cfg.rl.eval_prompts
    if cfg.rl.prompts == "shakespeare":
        train, held_out = shakespeare_prompts(cfg.data.val_fraction if cfg.data.source == "shakespeare" else 0.1)
        # A fixed shuffle so the held-out set is spread over the validation plays.
        random.Random(0).shuffle(held_out)
        held_out = held_out[:n_eval]
    else:
        prompts = _read_file(Path(cfg.rl.prompts))
        if len(prompts) <= n_eval:
            raise JaxgptError(f"rl.prompts '{cfg.rl.prompts}' has {len(prompts)} prompts; it needs more than "
                              f"rl.eval_prompts ({n_eval}), which are held out")
        train, held_out = prompts[:len(prompts) - n_eval], prompts[len(prompts) - n_eval:]
    if not train:
        raise JaxgptError(f"rl.prompts '{cfg.rl.prompts}' gave no training prompts")
    return train, held_out
