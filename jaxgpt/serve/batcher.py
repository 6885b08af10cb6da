"""Batching: requests from many HTTP handlers share the device through one worker thread that owns the model.

Continuous batching (the default for a live model): the decode runs in jitted chunks of `chunk` tokens
over `max_batch` fixed slots (jaxgpt.serve.slots). Between chunks, rows that finished (end-of-text, a stop
string, their max_tokens, a client that went away) leave, and waiting requests are prefilled into the free
slots, each at its own position; so no request waits for another to end. Sampling settings are per row, so
any requests share the slots, and one seed per row keeps a row's tokens independent of its slot-mates.

Dynamic batching (`batching="dynamic"`, and always for an exported artifact, whose programs take one
position for the whole batch): the worker takes the oldest waiting job, waits up to `max_wait_ms` for
more, and runs up to `max_batch` jobs that share sampling settings (one traced value per batch in
jaxgpt.generate) as one batch: prompts left-padded into one bucket, one seed per row, the batch padded to a
power of two rows and max_new_tokens rounded up to a power of two (at least 16), so few shapes ever
compile. A job that arrives while a batch runs waits for that batch to end. In continuous mode the same
path runs, between two chunks, what does not fit a slot: generation past the context (its window slides)
runs alone.

The batcher drives an engine (jaxgpt.serve.engines): a live model or an exported artifact.

Streaming granularity: text goes out after each chunk, so a stream gets its tokens in groups of up to
`chunk`. Text that ends in half a UTF-8 character or in what may be the start of a stop string is held
back until the next chunk decides it (jaxgpt.textstream).

Scoring (`ScoreJob`: log-probabilities of given tokens, for `logprobs`/`echo`) runs through the same
queue: waiting score jobs, up to `max_batch` rows, share one forward pass (jaxgpt.scoring; live models only).
In continuous mode, while rows decode, scoring runs only once the decode has had as much time as the last
scoring run took: streamed logprobs then cover several chunks per pass, and decoding keeps at least half
the worker.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from jaxgpt.sampling import SamplingParams
from jaxgpt.serve.engines import as_engine
from jaxgpt.serve.metrics import Metrics
from jaxgpt.serve.protocol import ApiError
from jaxgpt.textstream import TextStream

log = logging.getLogger("jaxgpt.serve")

# Events a job sends back (from the worker thread): ("text", piece), ("done", finish_reason, n_tokens),
# ("scored", TokenLogprobs) for a ScoreJob, ("error", http_status, message).
Emit = Callable[[tuple], None]
BATCHING = ("continuous", "dynamic")
PREFIX_CACHE_MB = 256.0  # finished rows' caches kept for prompts that extend them (chat turns)


@dataclass(eq=False)
class Job:
    """One choice to generate: a prompt, its limits, and where its text goes."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    stops: list[str]
    emit: Emit
    cancelled: bool = False  # set by the HTTP side when the client goes away
    ids: list[int] = field(default_factory=list)
    text: TextStream | None = None  # the decoded text shown so far (made at the first chunk)
    finished: bool = False
    queued_at: float = 0.0

    @property
    def key(self) -> SamplingParams:
        """Jobs with equal keys can share a batch (greedy ignores top-k/top-p)."""
        s = self.sampling
        return s._replace(top_k=0, top_p=1.0) if s.temperature == 0 else s

    def feed(self, new_ids: list[int], ended: bool, decode: Callable[[list[int]], str],
             before_done: Callable[[], None] | None = None) -> None:
        """Add this chunk's tokens; send the text that is now certain; finish if the row is done (calling
        `before_done` first)."""
        if self.text is None:
            self.text = TextStream(decode, self.stops)
        room = self.max_new_tokens - len(self.ids)
        self.ids += new_ids[:room]
        reason = "length" if len(self.ids) >= self.max_new_tokens else "stop" if ended else None
        piece = self.text.feed(new_ids[:room], final=reason is not None)
        if self.text.stopped:
            reason = "stop"
        if piece:
            self.emit(("text", piece))
        if reason:
            if before_done is not None:
                before_done()
            self.finish(reason)

    def finish(self, reason: str) -> None:
        self.finished = True
        self.emit(("done", reason, len(self.ids)))

    def fail(self, status: int, message: str) -> None:
        self.finished = True
        self.emit(("error", status, message))


@dataclass(eq=False)
class ScoreJob:
    """One row of token ids to score (at most block_size tokens); `top_n` alternatives per position."""

    ids: list[int]
    top_n: int
    emit: Emit
    cancelled: bool = False
    finished: bool = False
    queued_at: float = 0.0
    key = "score"  # score jobs batch only with each other

    def fail(self, status: int, message: str) -> None:
        self.finished = True
        self.emit(("error", status, message))


class Batcher:
    """Queue + worker thread. `submit` is thread-safe; `close` cancels what has not run and stops the worker.
    `model` is a LanguageModel, an ExportedModel or an engine (jaxgpt.serve.engines); `batching` is
    'continuous' or 'dynamic'; `prefix_cache_mb` > 0 keeps finished rows' caches for prompts that extend
    them (continuous only: jaxgpt.serve.prefix_cache)."""

    def __init__(self, model, max_batch: int = 8, max_wait_ms: float = 5.0, chunk: int = 8, max_queue: int = 1024,
                 batching: str = "continuous", prefix_cache_mb: float = PREFIX_CACHE_MB):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}; got '{batching}'")
        self.engine = as_engine(model)
        self.continuous = batching == "continuous" and self.engine.can_slot  # exported artifacts batch dynamically
        max_batch = min(max_batch, self.engine.max_rows or max_batch)  # an export with fixed batch sizes
        self.max_batch, self.max_wait, self.chunk = max_batch, max_wait_ms / 1000, chunk
        self.max_queue = max_queue
        self.prefix_cache_bytes = int(prefix_cache_mb * 2**20)
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = self._abort = False
        self._thread = threading.Thread(target=self._loop, name="jaxgpt-batcher", daemon=True)
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0}
        self.running = 0  # rows in the batch on the device now
        # Continuous mode: the last scoring run's seconds, and the decode seconds since it (scoring's share).
        self._score_s = self._decode_s = 0.0
        self.metrics = Metrics(max_batch, lambda: self.pending, lambda: self.running)

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, jobs: list[Job | ScoreJob]) -> None:
        """Queue a request's jobs together (they can land in one batch); 503 when closing or full."""
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise ApiError(503, "the server is overloaded; retry later", type="server_error", code="overloaded")
            now = time.monotonic()
            for job in jobs:
                job.queued_at = now
            self._pending.extend(jobs)
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail queued ones, stop the running batch at its next chunk, join the worker."""
        with self._cv:
            self._closed = self._abort = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        for job in dropped:
            job.fail(503, "the server shut down before this request ran")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.max_wait
            while self.max_batch > 1 and len(self._pending) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            live = [j for j in self._pending if not j.cancelled]
            if not live:
                self._pending.clear()
                return []
            batch = self._compatible(live)
            taken = set(map(id, batch))
            self._pending = collections.deque(j for j in live if id(j) not in taken)
            return batch

    def _compatible(self, live: list) -> list:
        """The oldest job and, in arrival order, others with its key that still fit the context together."""
        block = self.engine.block_size
        batch = [live[0]]
        if isinstance(live[0], ScoreJob):  # each score row fits on its own; padding is on the right
            return [j for j in live if isinstance(j, ScoreJob)][:self.max_batch]
        longest, wanted = len(live[0].prompt_ids), live[0].max_new_tokens
        if longest + wanted > block:  # generation past the context slides its window: it runs alone
            return batch
        for job in live[1:]:
            if len(batch) == self.max_batch:
                break
            if job.key != batch[0].key:
                continue
            fits = max(longest, len(job.prompt_ids)) + max(wanted, job.max_new_tokens) <= block
            if fits:
                batch.append(job)
                longest, wanted = max(longest, len(job.prompt_ids)), max(wanted, job.max_new_tokens)
        return batch

    def _loop(self) -> None:
        if self.continuous:
            return self._loop_continuous()
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list) -> None:
        """One dynamic batch (or score batch) from start to end; a failure fails its requests, not the server."""
        scoring = isinstance(batch[0], ScoreJob)
        now = time.monotonic()
        self.metrics.batch("score" if scoring else "generate", len(batch),
                           sum(len(j.ids if scoring else j.prompt_ids) for j in batch),
                           [now - j.queued_at for j in batch])
        self.running = len(batch)
        try:
            self._score(batch) if scoring else self._run(batch)
        except Exception as e:
            log.exception("batch of %d failed", len(batch))
            for job in batch:
                if not job.finished:
                    job.fail(500, f"{'scoring' if scoring else 'generation'} failed: {type(e).__name__}: {e}")
        finally:
            self.running = 0
            self.metrics.generated(sum(len(j.ids) for j in batch if not scoring))

    def _loop_continuous(self) -> None:
        """Decode chunks over fixed slots; between chunks finished rows leave and waiting jobs are prefilled in."""
        slots = self.engine.slots(self.max_batch, self.chunk, self.prefix_cache_bytes)
        live: dict[int, Job] = {}  # slot -> its job
        while (taken := self._take(slots, live)) is not None:
            admitted, other = taken
            if other:  # scoring, or a generation whose window slides: the dynamic path, between two chunks
                began = time.monotonic()
                self._run_batch(other)
                if isinstance(other[0], ScoreJob):
                    self._score_s, self._decode_s = time.monotonic() - began, 0.0
            try:
                for job in admitted:
                    live[slots.admit(job.prompt_ids, job.max_new_tokens, job.sampling, job.seed)] = job
                if live:
                    self._chunk(slots, live, admitted)
            except Exception as e:  # a failed call fails the rows it held, not the server
                log.exception("continuous decode of %d rows failed", len(live))
                for job in [*live.values(), *admitted]:
                    if not job.finished:
                        job.fail(500, f"generation failed: {type(e).__name__}: {e}")
                live.clear()
                # The failed call may have consumed the donated cache: start from fresh slots.
                slots = self.engine.slots(self.max_batch, self.chunk, self.prefix_cache_bytes)
        for job in live.values():
            if not job.finished:
                job.fail(503, "the server shut down while this request was running")
        self.running = 0

    def _take(self, slots, live: dict[int, Job]) -> tuple[list[Job], list] | None:
        """(jobs to prefill into free slots, one batch for the dynamic path or []); None once closed."""
        with self._cv:
            while not self._pending and not live and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            admitted, other, waiting = [], [], collections.deque()
            # While rows decode, scoring waits until they have had as much time as its last run took: a stream's
            # scoring passes (one in flight per choice, covering every held piece) then cover several chunks.
            score_due = not live or self._decode_s >= self._score_s
            for job in self._pending:
                if job.cancelled:
                    continue
                if isinstance(job, ScoreJob) and not score_due:
                    waiting.append(job)
                    continue
                if isinstance(job, Job) and slots.fits(len(job.prompt_ids), job.max_new_tokens):
                    if len(admitted) < len(slots.free):
                        admitted.append(job)
                        continue
                elif not other or (isinstance(job, ScoreJob) and isinstance(other[0], ScoreJob)
                                   and len(other) < self.max_batch):
                    other.append(job)
                    continue
                waiting.append(job)
            self._pending = waiting
        return admitted, other

    def _chunk(self, slots, live: dict[int, Job], admitted: list[Job]) -> None:
        """One decode chunk over every slot; each row's tokens go to its job; finished rows free their slot."""
        now = time.monotonic()
        self.metrics.batch("generate", len(live), sum(len(j.prompt_ids) for j in admitted),
                           [now - j.queued_at for j in admitted])
        self.stats["batches"] += 1
        self.stats["rows"] += len(admitted)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        self.running = len(live)
        began = time.monotonic()
        new, ended = slots.step()
        self._decode_s += time.monotonic() - began
        self.metrics.generated(sum(len(new[s]) for s in live))
        for slot, job in list(live.items()):
            if job.cancelled or job.finished:  # the client went away: nothing worth keeping
                job.finished = True
                slots.release(slot)
                del live[slot]
                continue
            # A finished row's cache holds prompt + every token it produced: kept for a next turn before the
            # client hears `done`, so that copy (and its compile) is not charged to the client's next request.
            job.feed(new[slot], ended[slot], self.engine.tokenizer.decode,
                     lambda slot=slot, job=job: slots.release(slot, job.prompt_ids + job.ids))
            if job.finished:
                del live[slot]
        self.running = len(live)
        if slots.prefix is not None:
            self.stats.update(slots.prefix.stats)

    def _score(self, jobs: list[ScoreJob]) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        results = self.engine.score([j.ids for j in jobs], max(j.top_n for j in jobs), self.max_batch)
        for job, result in zip(jobs, results):
            job.finished = True
            job.emit(("scored", result))

    def _run(self, jobs: list[Job]) -> None:
        tok = self.engine.tokenizer
        B = len(jobs)
        rows = self.engine.rows(B)  # padded rows: few compiled shapes
        prompts = [j.prompt_ids for j in jobs] + [jobs[0].prompt_ids] * (rows - B)
        seeds = [j.seed for j in jobs] + [0] * (rows - B)
        wanted = max(j.max_new_tokens for j in jobs)
        self.stats["batches"] += 1
        self.stats["rows"] += B
        self.stats["largest_batch"] = max(self.stats["largest_batch"], B)
        chunks = self.engine.stream(prompts, wanted, jobs[0].sampling, seeds, self.chunk)
        try:
            for new in chunks:
                if self._abort:
                    for job in jobs:
                        if not job.finished:
                            job.fail(503, "the server shut down while this request was running")
                    return
                steps = max(len(r) for r in new)  # a row still running produced exactly this many
                for job, toks in zip(jobs, new):
                    if job.cancelled and not job.finished:
                        job.finished = True
                    if not job.finished:
                        job.feed(toks, len(toks) < steps, tok.decode)
                if all(j.finished for j in jobs):
                    return
            for job in jobs:  # the decode ended (end-of-text everywhere, or n tokens)
                if not job.finished:
                    job.feed([], True, tok.decode)
        finally:
            chunks.close()
