"""One chat template for dialogue records, and its tokenization with a loss mask.

A dialogue renders as role headers followed by the turn's text:

    ### User:
    How are you?

    ### Assistant:
    Well.<|endoftext|>

Only assistant turns (their text and the end-of-text that closes them) carry loss; a prompt/response
pair is a two-turn dialogue. Generation prompts end with the assistant header.
"""

from __future__ import annotations

import numpy as np

from jaxgpt.data.tokenizers import Tokenizer
from jaxgpt.errors import JaxgptError

ROLES = ("system", "user", "assistant")


def header(role: str) -> str:
    return f"### {role.capitalize()}:\n"


def validate_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise JaxgptError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise JaxgptError(f"{where}: turn {i + 1} needs 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise JaxgptError(f"{where}: turn {i + 1} has role '{turn['role']}'; use one of {', '.join(ROLES)}")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise JaxgptError(f"{where}: no assistant turn, so nothing to learn from")


def render_messages(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """(text, in_loss) segments; the end-of-text after each assistant turn is added at tokenization."""
    segments = []
    for turn in messages:
        segments.append((header(turn["role"]), False))
        segments.append((str(turn["content"]), turn["role"] == "assistant"))
        segments.append(("\n\n", False))
    return segments[:-1]  # nothing after the last turn


def render_prompt(messages: list[dict[str, str]]) -> str:
    """The text a model continues to produce the next assistant turn."""
    context = "".join(text for text, _ in render_messages(messages))
    return (context + "\n\n" if context else "") + header("assistant")


def tokenize_dialogue(messages: list[dict[str, str]], tok: Tokenizer, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_N, in_loss_N): ids of the rendered dialogue, True where the token is an assistant's."""
    ids: list[int] = []
    in_loss: list[bool] = []
    for text, trained in render_messages(messages):
        piece = tok.encode(text) if text else []
        ids += piece
        in_loss += [trained] * len(piece)
        if trained:  # the turn ends with end-of-text, so the model learns to stop
            ids.append(tok.eos_id)
            in_loss.append(True)
    return np.asarray(ids[:max_tokens], np.int32), np.asarray(in_loss[:max_tokens], bool)
