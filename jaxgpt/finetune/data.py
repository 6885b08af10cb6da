"""Labelled task data: local JSONL/CSV, TFDS datasets by name, and the built-in Shakespeare genre task.

Every source becomes a `TaskData` of train/val/test `Example`s. Records are `text`/`label`
(classification), `prompt`/`response` or `messages` (SFT). Errors name the file and line.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from jaxgpt.config import FinetuneConfig
from jaxgpt.data import sources
from jaxgpt.data.records import read_jsonl
from jaxgpt.errors import JaxgptError
from jaxgpt.conversation import validate_messages

TASKS = ("classify", "sft")


@dataclass
class Example:
    where: str  # "train.jsonl line 3": named in error messages
    text: str = ""  # classify
    label: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)  # sft: prompt/response becomes two turns


@dataclass
class TaskData:
    task: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
    labels: list[str]  # classify: class names, index = class id

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "val": self.val, "validation": self.val, "test": self.test}[name]


# ---- records from local files ------------------------------------------------------------------

def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for n, record in read_jsonl(path):
        yield f"{path} line {n}", record


def _read_csv(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise JaxgptError(f"{path}: empty CSV file (the first line must name the columns)")
        for record in reader:
            where = f"{path} line {reader.line_num}"
            extra = record.pop(None, None) or []
            got = sum(v is not None for v in record.values()) + len(extra)
            if got != len(reader.fieldnames):
                raise JaxgptError(f"{where}: expected {len(reader.fieldnames)} columns "
                                  f"({', '.join(reader.fieldnames)}), got {got}")
            yield where, record


def _read_file(path_str: str) -> Iterator[tuple[str, dict]]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise JaxgptError(f"task file '{path}' not found")
    if path.suffix.lower() in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _read_csv(path)
    raise JaxgptError(f"task file '{path}': use .jsonl or .csv")


def _to_example(where: str, record: dict, task: str, cfg: FinetuneConfig) -> Example:
    if task == "classify":
        text_key, label_key = cfg.text_field or "text", cfg.label_field or "label"
        if text_key not in record or label_key not in record:
            raise JaxgptError(f"{where}: a classification record needs '{text_key}' and '{label_key}'; "
                              f"it has {', '.join(map(str, record)) or 'no fields'}")
        return Example(where, text=str(record[text_key]), label=str(record[label_key]).strip())
    messages_key = cfg.text_field or "messages"
    if messages_key in record:
        messages = record[messages_key]
        if isinstance(messages, str):  # CSV cells hold the JSON list as text
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise JaxgptError(f"{where}: '{messages_key}' is not a JSON list of turns") from None
        validate_messages(messages, where)
        return Example(where, messages=messages)
    prompt_key, response_key = cfg.prompt_field or "prompt", cfg.response_field or "response"
    if prompt_key not in record or response_key not in record:
        raise JaxgptError(f"{where}: an SFT record needs '{prompt_key}' and '{response_key}', or '{messages_key}'; "
                          f"it has {', '.join(map(str, record)) or 'no fields'}")
    return Example(where, messages=[{"role": "user", "content": str(record[prompt_key])},
                                    {"role": "assistant", "content": str(record[response_key])}])


# ---- TFDS -------------------------------------------------------------------------------------

def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _squad(ex: dict) -> dict:
    answers = ex["answers"]["text"]
    answer = answers[0] if len(answers) else ""
    return {"prompt": f"{_text(ex['context'])}\n\nQuestion: {_text(ex['question'])}", "response": _text(answer)}


# name -> (task, record mapper, split names for train/val/test; None = carve val from train)
TFDS_TASKS: dict[str, tuple[str, Callable[[dict], dict], tuple[str, str | None, str | None]]] = {
    "imdb_reviews": ("classify", lambda ex: {"text": _text(ex["text"]), "label": ex["label"]},
                     ("train", None, "test")),
    # GLUE hides its test labels, so its validation split serves as test.
    "glue/sst2": ("classify", lambda ex: {"text": _text(ex["sentence"]), "label": ex["label"]},
                  ("train", None, "validation")),
    "cnn_dailymail": ("sft", lambda ex: {"prompt": _text(ex["article"]), "response": _text(ex["highlights"])},
                      ("train", "validation", "test")),
    "squad": ("sft", _squad, ("train", None, "validation")),
}


def _tfds_source(name: str, split: str, cfg: FinetuneConfig):
    import tensorflow_datasets as tfds

    kwargs = {"data_dir": cfg.tfds_data_dir} if cfg.tfds_data_dir else {}
    try:
        return tfds.data_source(name, split=split, download=False, **kwargs)
    except Exception as e:  # TFDS raises many types for "not prepared" / "no such split"
        raise JaxgptError(f"cannot open TFDS dataset '{name}' split '{split}' ({str(e).splitlines()[0][:160]}); "
                          "prepare it with `tfds build NAME --file_format=array_record` and set "
                          "finetune.tfds_data_dir") from None


def _tfds_records(name: str, split: str, cfg: FinetuneConfig) -> Iterator[tuple[str, dict]]:
    source = _tfds_source(name, split, cfg)
    mapper = TFDS_TASKS[name][1] if name in TFDS_TASKS else _generic_tfds(cfg)
    names = _class_names(source)
    limit = len(source) if cfg.max_examples <= 0 else min(len(source), cfg.max_examples)
    for i in range(limit):
        record = mapper(source[i])
        if names and "label" in record and isinstance(record["label"], (int, np.integer)):
            record["label"] = names[int(record["label"])]  # ClassLabel ids -> their names
        yield f"tfds:{name}[{split}] example {i}", record


def _class_names(source) -> list[str]:
    try:
        return list(source.dataset_info.features["label"].names)
    except Exception:  # noqa: BLE001  (no info or no ClassLabel 'label': keep raw values)
        return []


def _generic_tfds(cfg: FinetuneConfig) -> Callable[[dict], dict]:
    def mapper(ex: dict) -> dict:
        return {k: (_text(v) if isinstance(v, (bytes, str)) else v) for k, v in ex.items()}

    return mapper


# ---- the built-in task: Shakespeare passages by genre --------------------------------------------

GENRES = {"comedies": "comedy", "problems": "comedy", "romances": "comedy",
          "tragedies": "tragedy", "roman": "tragedy", "histories": "history"}


def _passages(text: str, chars: int) -> list[str]:
    """Spoken text after the first ACT heading (titles name the genre), cut into ~`chars` pieces."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ACT ")), 0)
    body = [line for line in lines[start:] if not re.match(r"(ACT|SCENE) ", line)]
    passages, current = [], ""
    for line in body:
        current += line + "\n"
        if len(current) >= chars:
            passages.append(current.strip())
            current = ""
    return passages


def shakespeare_genre(cfg: FinetuneConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """Passages labelled comedy/tragedy/history, split BY PLAY: within each genre (plays sorted), every
    5th play from the 2nd goes to test and every 5th from the 4th to validation."""
    by_genre: dict[str, list[Path]] = {}
    for path in sources.shakespeare_files():
        by_genre.setdefault(GENRES[sources.play_genre(f"{path.parent.name}/{path.stem}")], []).append(path)
    splits: tuple[list[Example], ...] = ([], [], [])
    for genre, paths in sorted(by_genre.items()):
        for i, path in enumerate(sorted(paths, key=lambda p: p.stem)):
            passages = _passages(sources.render_play(path.read_text(encoding="utf-8")), cfg.passage_chars)
            if cfg.passages_per_play and len(passages) > cfg.passages_per_play:
                keep = np.linspace(0, len(passages) - 1, cfg.passages_per_play).round().astype(int)
                passages = [passages[k] for k in keep]
            target = splits[2] if i % 5 == 1 else splits[1] if i % 5 == 3 else splits[0]
            target.extend(Example(f"{path.stem} passage {k}", text=p, label=genre) for k, p in enumerate(passages))
    return splits


# ---- putting a task together -------------------------------------------------------------------

def _carve(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    # Every period-th example, as the pretraining corpus splits documents: deterministic and spread out.
    val = [ex for i, ex in enumerate(examples) if sources._is_val(i, fraction)]
    train = [ex for i, ex in enumerate(examples) if not sources._is_val(i, fraction)]
    return train, val


def _from_records(records: Iterator[tuple[str, dict]], task: str, cfg: FinetuneConfig) -> list[Example]:
    out = []
    for where, record in records:
        out.append(_to_example(where, record, task, cfg))
        if cfg.max_examples and len(out) >= cfg.max_examples:
            break
    return out


def task_kind(cfg: FinetuneConfig) -> str:
    """The task: finetune.task, or the one the named TFDS/built-in source implies."""
    name = cfg.source.removeprefix("tfds:")
    implied = "classify" if cfg.source == "shakespeare_genre" else TFDS_TASKS.get(name, ("",))[0]
    task = cfg.task or implied
    if task not in TASKS:
        raise JaxgptError(f"finetune.task must be one of {', '.join(TASKS)} (got '{cfg.task}')")
    return task


def load_task(cfg: FinetuneConfig) -> TaskData:
    """Read train/val/test for `cfg.source`; validation is carved from train when there is none."""
    task = task_kind(cfg)
    if cfg.source == "shakespeare_genre":
        if task != "classify":
            raise JaxgptError("finetune.source=shakespeare_genre is a classification task; set finetune.task=classify")
        train, val, test = shakespeare_genre(cfg)
    elif cfg.source.startswith("tfds:"):
        name = cfg.source.removeprefix("tfds:")
        names = TFDS_TASKS[name][2] if name in TFDS_TASKS else ("train", "validation", "test")
        train = _from_records(_tfds_records(name, names[0], cfg), task, cfg)
        val = _from_records(_tfds_records(name, names[1], cfg), task, cfg) if names[1] else []
        test = _from_records(_tfds_records(name, names[2], cfg), task, cfg) if names[2] else []
    else:
        train = _from_records(_read_file(cfg.source.removeprefix("file:")), task, cfg)
        val = _from_records(_read_file(cfg.val_source), task, cfg) if cfg.val_source else []
        test = _from_records(_read_file(cfg.test_source), task, cfg) if cfg.test_source else []
    if not val:
        train, val = _carve(train, cfg.val_fraction)
    if not train or not val:
        raise JaxgptError(f"finetune.source '{cfg.source}' gave {len(train)} training and {len(val)} validation "
                          "examples; both must be non-empty")
    labels = check_labels(cfg, train, val, test) if task == "classify" else []
    return TaskData(task, train, val, test, labels)


def check_labels(cfg: FinetuneConfig, train: list[Example], *others: list[Example]) -> list[str]:
    """The class list (config or sorted train labels); any other label is an error naming its line."""
    labels = [s.strip() for s in cfg.labels.split(",") if s.strip()] or sorted({ex.label for ex in train})
    if len(labels) < 2:
        raise JaxgptError(f"classification needs at least 2 classes; the training data has {labels}")
    known = set(labels)
    for split in (train, *others):
        for ex in split:
            if ex.label not in known:
                raise JaxgptError(f"{ex.where}: unknown label '{ex.label}' (labels: {', '.join(labels)})")
    return labels


def prompt_and_reference(ex: Example) -> tuple[list[dict[str, str]], str]:
    """Everything before the last assistant turn, and that turn's text (for generative metrics)."""
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return ex.messages[:last], ex.messages[last]["content"]


def describe(task: TaskData) -> dict[str, Any]:
    sizes = {"train": len(task.train), "val": len(task.val), "test": len(task.test)}
    if task.task == "classify":
        counts = {name: {lab: sum(ex.label == lab for ex in split) for lab in task.labels}
                  for name, split in (("train", task.train), ("val", task.val), ("test", task.test))}
        return {"task": task.task, "sizes": sizes, "labels": task.labels, "counts": counts}
    return {"task": task.task, "sizes": sizes}
