"""Finished rows' KV caches, kept so a request that starts with the same tokens skips their prefill.

A chat client sends the whole conversation every turn: the prompt of turn k+1 is the prompt of turn k,
its reply and the new message. When a row finishes, its cache (prompt + reply, every position written) is
kept here under its token ids; a new prompt takes the entry sharing its longest prefix, and only the rest
of the prompt is prefilled (jaxgpt.serve.slots). Entries are evicted least recently used first, to stay
within a budget of bytes; an evicted conversation is simply prefilled in full again.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import numpy as np


class Entry(NamedTuple):
    ids: np.ndarray  # the tokens whose keys/values the cache holds, in positions 0..len-1
    kv: Any  # one cache row: {"h_i": {"k": ExHxK, "v": ExHxK}}, E >= len(ids) (a power-of-two bucket)
    nbytes: int

    @property
    def length(self) -> int:
        """E: the cache slots `kv` holds."""
        return jax.tree.leaves(self.kv)[0].shape[0]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """An LRU of Entry by bytes; `find` the longest shared prefix, `put` a finished row."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._next = 0
        self.stats = {"prefix_cache_hits": 0, "prefix_cache_tokens_reused": 0, "prefix_cache_evictions": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, prompt_ids: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the most leading tokens with the prompt, and how many (0: none)."""
        prompt = np.asarray(prompt_ids, np.int32)
        best, best_n, best_key = None, 0, None
        for key, entry in self._entries.items():
            n = common_prefix(prompt, entry.ids)
            if n > best_n:
                best, best_n, best_key = entry, n, key
        if best_key is not None:
            self._entries.move_to_end(best_key)  # recently used: evicted last
        return best, best_n

    def put(self, ids: list[int], kv) -> None:
        """Keep a row's cache; the oldest entries go until the total fits (a row larger than it all is dropped)."""
        nbytes = sum(a.nbytes for a in jax.tree.leaves(kv))
        if nbytes > self.max_bytes:
            return
        ids_arr = np.asarray(ids, np.int32)
        for key, entry in list(self._entries.items()):  # a row this one extends is now redundant
            if len(entry.ids) <= len(ids_arr) and common_prefix(ids_arr, entry.ids) == len(entry.ids):
                self._drop(key)
        while self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats["prefix_cache_evictions"] += 1
        self._entries[self._next] = Entry(ids_arr, kv, nbytes)
        self._next += 1
        self.nbytes += nbytes

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
