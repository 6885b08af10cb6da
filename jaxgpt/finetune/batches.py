"""Examples -> token arrays -> left-padded batches whose lengths fall in a few power-of-two buckets.

Rows are right-aligned (left padding) and `start_B` counts the padding, which the model's attention
mask and positions already understand; so the last token of every row sits at index T-1. Batches have
a fixed number of rows (evaluation fills the last one with weight-0 rows), so the compiled shapes are
(B, bucket) for a handful of buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from jaxgpt import conversation
from jaxgpt.data.tokenizers import Tokenizer
from jaxgpt.finetune.data import Example

MIN_BUCKET = 16


def bucket(n: int, max_len: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET), capped at max_len."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, max_len)


@dataclass
class Encoded:
    """Token ids per example; `label_N` for classification, `in_loss` per token for SFT."""

    ids: list[np.ndarray]
    label_N: np.ndarray | None = None
    in_loss: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def encode(examples: list[Example], task: str, tok: Tokenizer, max_len: int, labels: list[str],
           template: conversation.Template = conversation.DEFAULT) -> Encoded:
    """Token ids of examples; SFT dialogues in `template` (the run's, so chat and serving see the same ids)."""
    if task == "classify":
        index = {lab: i for i, lab in enumerate(labels)}
        ids = [np.asarray(tok.encode(ex.text)[:max_len] or [tok.eos_id], np.int32) for ex in examples]
        return Encoded(ids, label_N=np.asarray([index[ex.label] for ex in examples], np.int32))
    # SFT rows hold max_len inputs plus one more token as the last target.
    pairs = [conversation.dialogue_ids(template, ex.messages, tok, max_len + 1) for ex in examples]
    return Encoded([p[0] for p in pairs], in_loss=[p[1] for p in pairs])


def make_batch(enc: Encoded, rows: np.ndarray, batch_size: int, max_len: int, pad_id: int,
               keep: slice = slice(None)) -> dict[str, np.ndarray]:
    """Left-padded batch of `rows` (then weight-0 filler rows up to batch_size). Only its rows `keep` (this
    host's) are built, at the width the whole batch needs, so every host agrees on the shape."""
    sft = enc.in_loss is not None
    lengths = [len(enc.ids[r]) - sft for r in rows]
    T = bucket(max(lengths), max_len)
    lo, hi, _ = keep.indices(batch_size)
    B = hi - lo
    tokens_BxT, target_BxT = np.full((B, T), pad_id, np.int32), np.full((B, T), pad_id, np.int32)
    mask_BxT = np.zeros((B, T), np.float32)
    start_B = np.full((B,), T - 1, np.int32)  # filler rows: one pad token
    weight_B, label_B = np.zeros((B,), np.float32), np.zeros((B,), np.int32)
    for b in range(lo, min(hi, len(rows))):
        r, n, i = rows[b], lengths[b], b - lo
        start_B[i], weight_B[i] = T - n, 1.0
        tokens_BxT[i, T - n:] = enc.ids[r][:n]
        if sft:
            target_BxT[i, T - n:] = enc.ids[r][1:n + 1]
            mask_BxT[i, T - n:] = enc.in_loss[r][1:n + 1]  # loss on a target iff it is an assistant token
        else:
            label_B[i] = enc.label_N[r]
    batch = {"tokens": tokens_BxT, "start": start_B, "weight": weight_B}
    return {**batch, "targets": target_BxT, "mask": mask_BxT} if sft else {**batch, "label": label_B}


def train_batches(enc: Encoded, batch_size: int, max_len: int, pad_id: int, seed: int, start_step: int = 0,
                  keep: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches (their rows `keep`): each epoch shuffles, sorts windows of 16 batches by length (less
    padding), cuts them into batches and shuffles the batch order. A pure function of (seed, epoch)."""
    n = len(enc)
    if n < batch_size:
        raise ValueError(f"{n} training examples are fewer than the batch size {batch_size}")
    lengths = np.asarray([len(ids) for ids in enc.ids])
    step, epoch = 0, 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
        window = 16 * batch_size
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.array_split(order, max(1, -(-n // window)))])
        batches = [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        for k in rng.permutation(len(batches)):
            if step >= start_step:
                yield make_batch(enc, batches[k], batch_size, max_len, pad_id, keep)
            step += 1
        epoch += 1


def eval_batches(enc: Encoded, batch_size: int, max_len: int, pad_id: int) -> Iterator[tuple[np.ndarray, dict]]:
    """(example indices, batch) over every example once, sorted by length so buckets stay tight."""
    order = np.argsort([len(ids) for ids in enc.ids], kind="stable")
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        yield rows, make_batch(enc, rows, batch_size, max_len, pad_id)
