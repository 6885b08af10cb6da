"""Sampling settings and scoring limits, with no model code: the server of an exported artifact imports
them without Flax (jaxgpt.generate and jaxgpt.scoring use the same values)."""

from __future__ import annotations

from typing import NamedTuple

MAX_TOP = 20  # the most alternatives per position a caller may ask for (OpenAI allows 20)


class SamplingParams(NamedTuple):
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the sequence
    min_new_tokens: int = 0  # end-of-text is banned before this many new tokens


def prompt_bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())
