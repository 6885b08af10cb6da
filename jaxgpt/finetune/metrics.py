"""Evaluation metrics and the selection rules built on them: which metric, which direction, when to stop.

Classification: loss, accuracy, macro-F1. Generative: loss, exact match, ROUGE-L (F-measure over
whitespace tokens).
"""

from __future__ import annotations

import re

import numpy as np

from jaxgpt.errors import JaxgptError

MAXIMISED = ("accuracy", "macro_f1", "exact_match", "rouge_l")
METRICS = {"classify": ("loss", "accuracy", "macro_f1"), "sft": ("loss", "exact_match", "rouge_l")}


def selection_metric(task: str, name: str) -> tuple[str, str]:
    """(metric, 'max' or 'min'): finetune.metric or the task's default (macro-F1, or loss for SFT)."""
    name = name or ("macro_f1" if task == "classify" else "loss")
    if name not in METRICS[task]:
        raise JaxgptError(f"finetune.metric '{name}' is not reported for task '{task}'; use one of "
                          f"{', '.join(METRICS[task])}")
    return name, "max" if name in MAXIMISED else "min"


def accuracy(pred_N: np.ndarray, true_N: np.ndarray) -> float:
    return float(np.mean(pred_N == true_N)) if len(true_N) else 0.0


def macro_f1(pred_N: np.ndarray, true_N: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in the labels or the predictions."""
    scores = []
    for c in range(n_classes):
        tp = np.sum((pred_N == c) & (true_N == c))
        fp, fn = np.sum((pred_N == c) & (true_N != c)), np.sum((pred_N != c) & (true_N == c))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def exact_match(prediction: str, reference: str) -> float:
    return float(" ".join(_words(prediction)) == " ".join(_words(reference)))


def rouge_l(prediction: str, reference: str) -> float:
    """F-measure of the longest common subsequence of (lower-cased) word tokens."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Is `value` better than `best` by more than min_delta in direction `mode`?"""
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


class EarlyStopping:
    """Stop after `patience` evaluations in a row without an improvement of more than `min_delta`."""

    def __init__(self, patience: int, min_delta: float, mode: str):
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; True when training should stop."""
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience
