"""`GET /metrics` in Prometheus' text format (version 0.0.4), written by hand: counters, gauges, histograms.

Recorded by the HTTP middleware (requests by route and status, latency until the last byte, streams
included) and by the batcher (tokens, queue wait, rows per batch and their occupancy of max_batch; with
continuous batching a batch is one decode chunk and a row's wait ends at its prefill);
gauges (queue length, rows running) are read when scraped. Every update takes one lock: the batcher's
thread and the event loop both write.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
          "/tokenizer_info")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if x != int(x) else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *label_values: str) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values and not self.labels:
            out.append(f"{self.name} 0")
        out += [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return out


class Gauge:
    """A value read at scrape time."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def lines(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        self.name, self.help, self.buckets, self.labels = name, help, tuple(sorted(buckets)), labels
        self.series: dict[tuple[str, ...], list[float]] = {}  # per bucket counts (not cumulative), then sum

    def observe(self, value: float, *label_values: str) -> None:
        counts = self.series.setdefault(label_values, [0.0] * (len(self.buckets) + 2))
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        counts[i] += 1
        counts[-1] += value

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self.series.items()):
            running = 0.0
            for bound, c in zip(self.buckets + (math.inf,), counts):
                running += c
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {_number(running)}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_number(counts[-1])}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {_number(running)}")
        return out


class Metrics:
    """The server's metrics; `inc`/`observe` are thread-safe, `render()` is the /metrics body."""

    def __init__(self, max_batch: int, queue_length: Callable[[], float], running_rows: Callable[[], float]):
        self._lock = threading.Lock()
        rows = tuple(float(1 << i) for i in range(max(1, max_batch).bit_length() + 1))
        self.requests = Counter("jaxgpt_requests_total", "HTTP requests answered, by route and status code.",
                                ("route", "status"))
        self.latency = Histogram("jaxgpt_request_duration_seconds", "Time from request to last response byte.",
                                 LATENCY_BUCKETS, ("route",))
        self.prompt_tokens = Counter("jaxgpt_prompt_tokens_total", "Prompt tokens of the rows generated from.")
        self.generated_tokens = Counter("jaxgpt_generation_tokens_total", "Tokens generated.")
        self.scored_tokens = Counter("jaxgpt_scored_tokens_total", "Tokens of the rows scored (logprobs, echo).")
        self.queue_wait = Histogram("jaxgpt_queue_wait_seconds", "Time a row waited in the queue before its batch ran.",
                                    LATENCY_BUCKETS)
        self.batch_rows = Histogram("jaxgpt_batch_rows", "Rows per batch (continuous: per decode chunk) on the device, "
                                    "by kind.", rows, ("kind",))
        self.occupancy = Histogram("jaxgpt_batch_occupancy_ratio", "Rows per batch as a fraction of max_batch.",
                                   (0.125, 0.25, 0.5, 0.75, 1.0), ("kind",))
        self.max_batch = max_batch
        self._all = [self.requests, self.latency, self.prompt_tokens, self.generated_tokens, self.scored_tokens,
                     self.queue_wait,
                     self.batch_rows, self.occupancy,
                     Gauge("jaxgpt_queue_length", "Rows waiting for a batch.", queue_length),
                     Gauge("jaxgpt_running_rows", "Rows in the batch running now.", running_rows),
                     Gauge("jaxgpt_max_batch", "The most rows one batch runs.", lambda: max_batch)]

    def request(self, route: str, status: int, seconds: float) -> None:
        route = route if route in ROUTES else "other"  # arbitrary paths must not grow the label set
        with self._lock:
            self.requests.inc(1, route, str(status))
            self.latency.observe(seconds, route)

    def batch(self, kind: str, rows: int, tokens: int, waits: list[float]) -> None:
        """A batch starts: `kind` is 'generate' (tokens: prompt tokens) or 'score' (tokens: scored tokens)."""
        with self._lock:
            self.batch_rows.observe(rows, kind)
            self.occupancy.observe(rows / self.max_batch, kind)
            (self.scored_tokens if kind == "score" else self.prompt_tokens).inc(tokens)
            for w in waits:
                self.queue_wait.observe(w)

    def generated(self, n_tokens: int) -> None:
        with self._lock:
            self.generated_tokens.inc(n_tokens)

    def render(self) -> str:
        with self._lock:
            return "\n".join(line for m in self._all for line in m.lines()) + "\n"


class MetricsMiddleware:
    """ASGI middleware: counts each HTTP request and times it to its last body byte (streams included)."""

    def __init__(self, app, metrics: Callable[[], Metrics | None]):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def timed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                metrics.request(scope["path"], status[0], time.perf_counter() - start)
