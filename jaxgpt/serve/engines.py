"""What the batcher runs: a live model (a run dir; Flax and the model code) or an exported artifact (JAX alone).

Both engines have `tokenizer`, `template` (the chat template), `block_size`, `max_rows` (the most rows one
call takes; None: any) and

    rows(n)                              rows to pad a batch of n jobs to (few compiled shapes)
    stream(prompts, n, sampling, seeds, chunk)
                                         a generator of each row's new ids every `chunk` tokens; a row that
                                         gave fewer ids than the longest row has ended (end-of-text)
    score(rows, top_n, batch_size)       jaxgpt.score_rows.TokenLogprobs per row, only where `can_score`
    slots(n, chunk, prefix_cache_bytes) n decode slots for continuous batching (jaxgpt.serve.slots), only
                                         where `can_slot`

The live engine imports jaxgpt.generate, jaxgpt.scoring and jaxgpt.serve.slots when it first runs, so a
server of an exported artifact never loads them (nor Flax).
"""

from __future__ import annotations

from typing import Iterator

from jaxgpt.exported import ExportedModel
from jaxgpt.sampling import SamplingParams, prompt_bucket


class LiveEngine:
    """A `jaxgpt.LanguageModel`: generation and scoring."""

    can_score = can_slot = True
    max_rows = None

    def __init__(self, model):
        self.model = model
        self.tokenizer, self.template = model.tokenizer, model.template
        self.block_size = model.cfg.model.block_size

    @staticmethod
    def rows(n: int) -> int:
        return 1 << (n - 1).bit_length()

    def stream(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams, seeds: list[int],
               chunk: int) -> Iterator[list[list[int]]]:
        from jaxgpt.generate import stream_ids

        longest, block = max(len(p) for p in prompts), self.block_size
        # Within the context, round the length up to a power of two (>= 16) so few lengths compile; past it the
        # window slides (the batcher then runs the job alone) and n is exactly what it asked.
        n = max_new_tokens if longest + max_new_tokens > block else min(prompt_bucket(max_new_tokens), block - longest)
        return stream_ids(self.model.params, self.model.cfg.model, prompts, n, eos_id=self.tokenizer.eos_id,
                          n_vocab=self.tokenizer.vocab_size, sampling=sampling, seed=seeds, chunk=chunk)

    def slots(self, n_slots: int, chunk: int, prefix_cache_bytes: int = 0):
        from jaxgpt.serve.slots import Slots

        return Slots(self.model.params, self.model.cfg.model, n_slots, chunk, self.tokenizer.eos_id,
                     self.tokenizer.vocab_size, prefix_cache_bytes)

    def score(self, rows: list[list[int]], top_n: int, batch_size: int) -> list:
        from jaxgpt.scoring import token_logprobs

        return token_logprobs(self.model.params, self.model.cfg.model, rows, n_vocab=self.tokenizer.vocab_size,
                              top_n=top_n, batch_size=batch_size)


class ExportedEngine:
    """A `jaxgpt.exported.ExportedModel`: generation, and scoring where the artifact holds scoring programs;
    batched dynamically (its programs decode every row at one position)."""

    can_slot = False

    def __init__(self, model: ExportedModel):
        self.model = model
        self.can_score = model.can_score  # artifacts exported before scoring programs existed have none
        self.tokenizer, self.template, self.block_size = model.tokenizer, model.template, model.block_size
        sizes = model.batch_sizes
        self.max_rows = max(sizes) if sizes else None

    def rows(self, n: int) -> int:
        sizes = self.model.batch_sizes
        return next(s for s in sizes if s >= n) if sizes else LiveEngine.rows(n)

    def stream(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams, seeds: list[int],
               chunk: int) -> Iterator[list[list[int]]]:
        s = sampling
        return self.model.stream_ids(prompts, max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                     top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                                     min_new_tokens=s.min_new_tokens, seed=seeds, chunk=chunk)

    def score(self, rows: list[list[int]], top_n: int, batch_size: int) -> list:
        return self.model.token_logprobs(rows, top_n, batch_size)


def as_engine(model) -> LiveEngine | ExportedEngine:
    """The engine for a LanguageModel or an ExportedModel (an engine is returned as it is)."""
    if isinstance(model, (LiveEngine, ExportedEngine)):
        return model
    return ExportedEngine(model) if isinstance(model, ExportedModel) else LiveEngine(model)
