"""The one conversation format: how a dialogue becomes token ids, for SFT, evaluation, chat and serving.

Every message is its role header and text, tokenized as one string, then the end-of-text id:

    SYSTEM:\\n{text}<eot>        (optional, first)
    USER:\\n{text}<eot>
    ASSISTANT:\\n{text}<eot>

A model replies to a conversation's ids followed by the ids of the bare "ASSISTANT:\\n" header. The
end-of-text id is never produced by encoding text, so every message starts at a token boundary: a
conversation's ids are the concatenation of its messages' ids, whether built turn by turn or at once.
Inside a message the header's ids must be a prefix of the message's ids (so the generation prompt is
exactly what training saw); where a tokenizer merges the header's last token into the text (GPT-2 BPE
before a reply that starts with a blank line), header and text are tokenized apart instead.

The headers use only upper-case letters, ':' and a newline, so a char tokenizer trained on plain English
can encode them. A run dir records its template in chat_template.json (SFT writes it, RL/DPO copy it);
a run dir without one gets DEFAULT.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxgpt.errors import JaxgptError

ROLES = ("system", "user", "assistant")
FILE = "chat_template.json"


@dataclass(frozen=True)
class Template:
    name: str = "jaxgpt-chat-1"
    system: str = "SYSTEM:\n"
    user: str = "USER:\n"
    assistant: str = "ASSISTANT:\n"

    def header(self, role: str) -> str:
        return getattr(self, role)


DEFAULT = Template()
Message = tuple[str, str]  # (role, text)


def as_pairs(messages: Sequence) -> list[Message]:
    """(role, text) pairs from {role, content} dicts or pairs."""
    return [(m["role"], str(m["content"])) if isinstance(m, dict) else (m[0], str(m[1])) for m in messages]


def validate_messages(messages, where: str) -> None:
    """A training dialogue: a non-empty list of {role, content} turns with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise JaxgptError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise JaxgptError(f"{where}: turn {i + 1} needs 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise JaxgptError(f"{where}: turn {i + 1} has role '{turn['role']}'; use one of {', '.join(ROLES)}")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise JaxgptError(f"{where}: no assistant turn, so nothing to learn from")


def check_prompt(messages, where: str) -> None:
    """A dialogue to reply to (RL/DPO prompts): {role, content} messages ending with the user's."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)
    if not (ok and messages[-1]["role"] == "user"):
        raise JaxgptError(f"{where}: a dialogue prompt must be a list of {{role, content}} messages "
                          f"(roles {', '.join(ROLES)}) ending with the user's")


# ---- token ids -----------------------------------------------------------------------------------

def header_ids(template: Template, role: str, tok) -> list[int]:
    return tok.encode(template.header(role))


def message_ids(template: Template, role: str, text: str, tok) -> tuple[list[int], int]:
    """(ids of one message including its closing end-of-text, how many of them are the header's)."""
    head = header_ids(template, role, tok)
    ids = tok.encode(template.header(role) + text)
    if ids[:len(head)] != head:  # the header's last token merged into the text: tokenize them apart
        ids = head + tok.encode(text)
    return ids + [tok.eos_id], len(head)


def conversation_ids(template: Template, messages: Sequence, tok) -> list[int]:
    """The ids of a whole conversation, every message closed by end-of-text."""
    return [t for role, text in as_pairs(messages) for t in message_ids(template, role, text, tok)[0]]


def prompt_ids(template: Template, messages: Sequence, tok) -> list[int]:
    """What a model continues to write the next assistant message: the conversation, then the bare header."""
    return conversation_ids(template, messages, tok) + header_ids(template, "assistant", tok)


def reply_ids(template: Template, text: str, tok) -> list[int]:
    """An assistant message's ids after its header (the reply text, then end-of-text): the trained targets."""
    ids, n_head = message_ids(template, "assistant", text, tok)
    return ids[n_head:]


def reply_text(template: Template, ids: Sequence[int], tok) -> str:
    """The text of generated reply ids (end-of-text and after dropped), decoded after the header so a
    tokenizer that drops a leading space at the start of a decode (sentencepiece) keeps it."""
    ids = list(ids)
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    head = template.header("assistant")
    text = tok.decode(header_ids(template, "assistant", tok) + ids)
    return text[len(head):] if text.startswith(head) else tok.decode(ids)


def dialogue_ids(template: Template, messages: Sequence, tok, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_N, in_loss_N) of a training dialogue: True on assistant text and its end-of-text, not headers."""
    ids: list[int] = []
    in_loss: list[bool] = []
    for role, text in as_pairs(messages):
        piece, n_head = message_ids(template, role, text, tok)
        ids += piece
        in_loss += [False] * n_head + [role == "assistant"] * (len(piece) - n_head)
    return np.asarray(ids[:max_tokens], np.int32), np.asarray(in_loss[:max_tokens], bool)


# ---- the run dir's record ------------------------------------------------------------------------

def save(template: Template, run_dir: str | Path) -> None:
    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(template), indent=1) + "\n")


def for_run(run_dir: str | Path) -> Template:
    """The template a run dir was trained with; DEFAULT for a run that never saw dialogues."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return DEFAULT
    try:
        fields = json.loads(path.read_text())
        return Template(**{f.name: str(fields[f.name]) for f in dataclasses.fields(Template)})
    except (json.JSONDecodeError, KeyError, TypeError):
        raise JaxgptError(f"'{path}' is not a chat template ({', '.join(f.name for f in dataclasses.fields(Template))}"
                          f"); restore it or delete it to use the default") from None


def inherit(init_from: str | Path, run_dir: str | Path) -> Template:
    """A run started from `init_from` keeps its template (and records it when `init_from` had one)."""
    template = for_run(init_from)
    if (Path(init_from) / FILE).is_file():
        save(template, run_dir)
    return template
