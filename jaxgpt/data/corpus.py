"""Tokenized corpus cache and the batch stream.

The corpus is tokenized once, streamed document by document into flat integer files
(`train.bin`, `val.bin`) under `data.cache_dir`, keyed by the source's bytes and the tokenizer, and read back
memory-mapped, so a corpus larger than RAM works. A batch is a set of random windows whose
positions are a pure function of (seed, step): a resumed run sees exactly the batches the
uninterrupted run would have, and each host reads only its rows of every global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxgpt import files
from jaxgpt.config import DataConfig
from jaxgpt.data import sources
from jaxgpt.data.tokenizers import Tokenizer
from jaxgpt.errors import JaxgptError

_FORMAT_VERSION = 2  # bump when sources render text differently


@dataclass
class Corpus:
    train: np.ndarray  # flat token ids, memory-mapped
    val: np.ndarray
    folder: Path


def cache_folder(cfg: DataConfig, tokenizer: Tokenizer) -> Path:
    root = Path(os.path.expanduser(cfg.cache_dir)) / "tokens"
    key = json.dumps({"v": _FORMAT_VERSION, "source": cfg.source, "field": cfg.text_field,
                      "val": cfg.val_fraction, "max_docs": cfg.max_documents, "tfds_dir": cfg.tfds_data_dir,
                      "tok": tokenizer.kind, "tok_fp": tokenizer.fingerprint(),
                      "content": content_digest(sources.source_files(cfg), root.parent / "file_hashes.json")},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root / digest


def content_digest(paths: list[str] | None, memo_file: Path) -> str | None:
    """SHA-256 over the files' bytes, so an edited or a different same-named corpus gets its own cache.

    Each file's hash is remembered in `memo_file` under its (size, mtime, ctime, inode): an unchanged file
    is not read again."""
    if paths is None:
        return None
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}  # missing or damaged: it is only a memo
    changed, digests = False, []
    for path in paths:
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        real = os.path.realpath(path)
        if memo.get(real, [None])[0] != stamp:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            memo[real], changed = [stamp, h.hexdigest()], True
        digests.append(memo[real][1])
    if changed:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(memo_file, memo, indent=None)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _write_split(docs: Iterator[tuple[str, str]], tokenizer: Tokenizer, path: Path, dtype) -> tuple[int, int]:
    n_tokens = n_docs = 0
    with open(path, "wb") as f:
        for _, text in docs:
            if not text.strip():
                continue
            ids = tokenizer.encode(text) + [tokenizer.eos_id]  # end-of-text separates documents
            np.asarray(ids, dtype=dtype).tofile(f)
            n_tokens += len(ids)
            n_docs += 1
    return n_tokens, n_docs


def _carve_tail(folder: Path, dtype, fraction: float) -> None:
    """One-document corpora cannot split by document: hold out the tail of the token stream instead."""
    train = np.fromfile(folder / "train.bin", dtype=dtype)
    cut = int(len(train) * (1 - max(fraction, 0.05)))
    train[cut:].tofile(folder / "val.bin")
    train[:cut].tofile(folder / "train.bin")
    warnings.warn("the corpus has a single document, so the validation split is its last "
                  f"{100 * (1 - cut / len(train)):.0f}% of tokens rather than whole documents", stacklevel=3)


def prepare(cfg: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """Tokenize the source into the cache (once) and return memory-mapped train/val token arrays."""
    folder = cache_folder(cfg, tokenizer)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            n_train, docs_train = _write_split(sources.documents(cfg, "train"), tokenizer, tmp / "train.bin", dtype)
            n_val, docs_val = _write_split(sources.documents(cfg, "val"), tokenizer, tmp / "val.bin", dtype)
            if n_train + n_val == 0:
                raise JaxgptError(f"data.source '{cfg.source}' holds no text (every document is empty)")
            if docs_val == 0:
                _carve_tail(tmp, dtype, cfg.val_fraction)
            if docs_train == 0:
                raise JaxgptError(f"data.source '{cfg.source}': every document went to validation; "
                                  "lower data.val_fraction or add documents")
            meta = {"source": cfg.source, "tokenizer": tokenizer.kind, "dtype": np.dtype(dtype).name,
                    "train_docs": docs_train, "val_docs": docs_val}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            try:
                os.rename(tmp, folder)  # atomic: a crash never leaves a half-written cache entry
            except OSError:
                shutil.rmtree(tmp)  # another process finished the same entry first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return Corpus(train=train, val=val, folder=folder)


def tokenizer_texts(cfg: DataConfig, splits=("train",), max_chars: int = 50_000_000) -> Iterator[str]:
    """Documents for fitting a tokenizer, capped so huge sources stay quick."""
    seen = 0
    for split in splits:
        for _, text in sources.documents(cfg, split):
            yield text
            seen += len(text)
            if seen >= max_chars:
                return


class WindowSampler:
    """Batch for step s = B random windows of T+1 tokens drawn with rng(seed, s); this host's rows only."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rows: slice = slice(None), split: str = "train"):
        if len(tokens) < block_size + 1:
            raise JaxgptError(f"the {split} split has {len(tokens)} tokens, fewer than model.block_size+1 "
                              f"({block_size + 1}); lower model.block_size or add text")
        self.tokens, self.block_size, self.batch_size, self.seed, self.rows = tokens, block_size, batch_size, seed, rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(step)])
        starts_B = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)[self.rows]
        windows_BxT1 = np.stack([self.tokens[s:s + self.block_size + 1] for s in starts_B]).astype(np.int32)
        return {"x": windows_BxT1[:, :-1], "y": windows_BxT1[:, 1:]}


def batch_stream(sampler: WindowSampler, start_step: int, end_step: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches for steps [start_step, end_step), assembled ahead of time by grain's reader threads."""
    import grain

    dataset = grain.MapDataset.range(start_step, end_step).map(sampler)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
