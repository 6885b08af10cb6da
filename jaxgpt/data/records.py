"""JSON Lines input with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from jaxgpt.errors import JaxgptError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line is a one-line JaxgptError."""
    path = Path(path)
    if not path.is_file():
        raise JaxgptError(f"'{path}' not found; pass an existing JSON Lines file")
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JaxgptError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise JaxgptError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
                yield n, record
        except UnicodeDecodeError:
            raise JaxgptError(f"{path} is not UTF-8 text") from None
