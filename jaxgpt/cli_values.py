"""Checks of command-line values, so NaN, infinities, zero or negative counts are one-line errors."""

from __future__ import annotations

import argparse
import math
import re

from jaxgpt.errors import JaxgptError

AT_LEAST_1 = ("max_new_tokens", "num_samples", "num_beams", "max_batch", "stream_chunk", "rounds", "query_size",
              "num_processes", "window", "stride")
AT_LEAST_0 = ("top_k", "no_repeat_ngram_size", "min_new_tokens", "process_id", "port")
INT_LISTS = ("batch_sizes", "prompt_buckets")  # "1,8": comma-separated positive integers


def check(args: argparse.Namespace) -> None:
    """Raise JaxgptError naming the first flag whose value cannot be right."""
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise JaxgptError(f"{flag} must be a finite number, got {value}")
        if name in AT_LEAST_1 and value < 1:
            raise JaxgptError(f"{flag} must be at least 1, got {value}")
        if name in AT_LEAST_0 and value < 0:
            raise JaxgptError(f"{flag} must be 0 or more, got {value}")
        if name in INT_LISTS and not re.fullmatch(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", value):
            raise JaxgptError(f"{flag} must be comma-separated positive integers like 1,8; got '{value}'")
    _range(args, "temperature", lambda v: v >= 0, "0 (greedy) or more")
    _range(args, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    _range(args, "repetition_penalty", lambda v: v > 0, "above 0 (1.0 is off)")
    _range(args, "port", lambda v: v <= 65535, "at most 65535")
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and checkpoint not in ("best", "latest") and not checkpoint.isdigit():
        raise JaxgptError(f"--checkpoint must be 'best', 'latest' or a step number, got '{checkpoint}'")


def _range(args: argparse.Namespace, name: str, ok, expected: str) -> None:
    value = getattr(args, name, None)
    if value is not None and not ok(value):
        raise JaxgptError(f"--{name.replace('_', '-')} must be {expected}, got {value}")
