"""Rewards: `reward(prompts, completions) -> list[float]`, one score per completion.

`rl.reward` picks one: a built-in verifiable reward that works offline (`syllables`, `target_word`,
`rhyme`), any Python callable as `module:function`, or a fine-tuned classifier as `classifier:RUN_DIR`
(the probability of `rl.reward_label`).

Verse rewards look only at complete lines (followed by a newline), skip blank lines and speaker
headings ('ROMEO:'), and give 0 to a completion without a complete line.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable, Sequence

from jaxgpt.config import RLConfig
from jaxgpt.errors import JaxgptError

Reward = Callable[[list[str], list[str]], list[float]]

_WORD = re.compile(r"[A-Za-z']+")
_SPEAKER = re.compile(r"^[A-Z][A-Za-z .,'&-]*:$")


def count_syllables(word: str) -> int:
    """Vowel groups in `word`, less a silent final 'e' ('bare' 1, 'table' 2); at least 1 for a word with letters."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 0
    groups = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and groups > 1:
        groups -= 1
    elif w.endswith("ed") and len(w) > 3 and w[-3] not in "td" and groups > 1:
        groups -= 1  # 'loved', 'walked': the -ed is not its own syllable (but 'wanted' keeps it)
    return max(groups, 1)


def line_syllables(line: str) -> int:
    return sum(count_syllables(w) for w in _WORD.findall(line))


def verse_lines(completion: str) -> list[str]:
    """Complete lines (a newline after them) that are neither blank nor a speaker heading."""
    complete = completion.split("\n")[:-1]
    return [ln.strip() for ln in complete if ln.strip() and not _SPEAKER.match(ln.strip())]


def syllable_score(line: str, target: int = 10) -> float:
    """1 at exactly `target` syllables, falling linearly to 0 at 0 or 2 x target."""
    return max(0.0, 1.0 - abs(line_syllables(line) - target) / target)


def syllables_reward(target: int = 10) -> Reward:
    """Mean over a completion's complete verse lines of how close each is to `target` syllables."""

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        out = []
        for text in completions:
            lines = verse_lines(text)
            out.append(sum(syllable_score(ln, target) for ln in lines) / len(lines) if lines else 0.0)
        return out

    return reward


def target_word_reward(word: str) -> Reward:
    """1.0 when the completion contains `word` as a whole word (any case), else 0.0."""
    if not word.strip():
        raise JaxgptError("rl.target_word must be a word for the target_word reward")
    pattern = re.compile(rf"\b{re.escape(word.strip())}\b", re.IGNORECASE)
    return lambda prompts, completions: [float(bool(pattern.search(c))) for c in completions]


def rhyme_key(word: str) -> str:
    """The last vowel group and what follows it ('night' -> 'ight', 'day' -> 'ay'): a spelling rhyme."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if w.endswith("e") and len(w) > 2 and w[-2] not in "aeiouy":
        w = w[:-1]  # 'fire' and 'desire' rhyme on 'ir'
    m = re.search(r"[aeiouy]+[^aeiouy]*$", w)
    return m.group(0) if m else w


def rhyme_reward() -> Reward:
    """Share of adjacent complete-line pairs whose last words rhyme (the same word twice does not count)."""

    def last_word(line: str) -> str:
        words = _WORD.findall(line)
        return words[-1].lower().strip("'") if words else ""

    def score(text: str) -> float:
        ends = [last_word(ln) for ln in verse_lines(text)]
        pairs = list(zip(ends, ends[1:]))
        if not pairs:
            return 0.0
        return sum(a != b and bool(a) and rhyme_key(a) == rhyme_key(b) for a, b in pairs) / len(pairs)

    return lambda prompts, completions: [score(c) for c in completions]


class ClassifierReward:
    """P(label) from a fine-tuned classifier (anything with `.labels` and `.classify(texts) -> (labels, NxC)`)."""

    def __init__(self, classifier: Any, label: str, batch_size: int = 16):
        labels = list(getattr(classifier, "labels", []))
        if not hasattr(classifier, "classify") or not labels:
            raise JaxgptError(f"the reward model is a {type(classifier).__name__}, not a classifier; "
                              "point rl.reward=classifier:RUN_DIR at a `jaxgpt finetune` classify run")
        if label not in labels:
            raise JaxgptError(f"rl.reward_label '{label}' is not one of the classifier's labels ({', '.join(labels)})")
        self.classifier, self.index, self.batch_size = classifier, labels.index(label), batch_size

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        # Only the completion is scored: the prompt is shared by a group and would only dilute the signal.
        _, probs_NxC = self.classifier.classify(list(completions), batch_size=self.batch_size)
        return [float(p) for p in probs_NxC[:, self.index]]


def _import_callable(spec: str) -> Reward:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise JaxgptError(f"rl.reward '{spec}': cannot import {attr} from {module_name} ({e})") from None
    if not callable(fn):
        raise JaxgptError(f"rl.reward '{spec}' is not callable")
    return fn


BUILTIN = ("syllables", "target_word", "rhyme")


def make_reward(cfg: RLConfig) -> Reward:
    """The reward `cfg.reward` names."""
    spec = cfg.reward
    if spec.startswith("classifier:"):
        from jaxgpt.finetune.infer import load_classifier

        return ClassifierReward(load_classifier(spec.removeprefix("classifier:")), cfg.reward_label)
    if ":" in spec:
        return _import_callable(spec)
    if spec == "syllables":
        if cfg.syllables <= 0:
            raise JaxgptError(f"rl.syllables must be positive, got {cfg.syllables}")
        return syllables_reward(cfg.syllables)
    if spec == "target_word":
        return target_word_reward(cfg.target_word)
    if spec == "rhyme":
        return rhyme_reward()
    raise JaxgptError(f"unknown rl.reward '{spec}'; use one of {', '.join(BUILTIN)}, module:function "
                      "or classifier:RUN_DIR")


def score(reward: Reward, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Call `reward` and check it gave one finite number per completion."""
    scores = reward(list(prompts), list(completions))
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise JaxgptError("the reward function must return a list of numbers") from None
    if len(scores) != len(completions):
        raise JaxgptError(f"the reward function returned {len(scores)} scores for {len(completions)} completions")
    if not all(math.isfinite(s) for s in scores):
        raise JaxgptError("the reward function returned a NaN or infinite score")
    return scores
