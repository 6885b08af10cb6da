"""The one training runner: every mode (pretraining, fine-tune, GRPO, DPO) supplies its step, evaluation and
batches as a `Mode`; the runner owns what makes a run durable and resumable.

It reads the stop request once per step (and agrees on it across hosts), refuses a NaN/Inf step before
anything of it is logged or saved, evaluates, saves and logs on one cadence, and writes the metrics log.
A SIGTERM/Ctrl-C finishes the step in flight, evaluates it and saves it. Modes keep everything that changes
from step to step either in the train state or in `loop_state()` (saved with each checkpoint), and draw
batches and random keys as functions of (seed, step), so running the same command again on the run dir
continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from jaxgpt import distributed, files
from jaxgpt.config import TrainConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.train.checkpoint import Checkpointer
from jaxgpt.train.metrics_log import MetricsLog
from jaxgpt.train.signals import StopRequest


class Mode:
    """What a training mode supplies; the defaults do nothing."""

    postfix: tuple[str, ...] = ("loss", "train_loss")  # record keys shown on the progress bar

    def step(self, state, step: int) -> tuple[Any, dict[str, float]]:
        """One optimizer step from `state` at `step`: (new state, host-side metrics; "params_finite" is checked)."""
        raise NotImplementedError

    def evaluate(self, state, step: int) -> dict[str, float]:
        """Held-out metrics of `state` (the checkpoint's selection metric among them)."""
        return {}

    def after_eval(self, record: dict[str, Any], step: int) -> str | None:
        """Called on scheduled evaluations only (not on ones a stop or a save added): a message to stop early."""
        return None

    def loop_state(self) -> dict[str, Any]:
        """JSON-able state of the mode's own loop (early stopping, plateau), saved with each checkpoint."""
        return {}

    def first_record(self) -> dict[str, Any] | None:
        """A record logged before step 1 of a fresh run (e.g. the held-out reward of the initial policy)."""
        return None

    def started(self) -> None:
        """The first step of this run (or resume) succeeded."""

    def speed(self, seconds_per_step: float) -> dict[str, float]:
        """Throughput fields for a logged record, from the mean time of the steps since the last one."""
        return {}


@dataclass
class Cadence:
    steps: int
    eval_every: int
    save_every: int
    log_every: int
    save_on_eval: bool = False  # keep every evaluated step as a checkpoint candidate (fine-tune selection)

    @classmethod
    def of(cls, tc: TrainConfig, save_on_eval: bool = False) -> Cadence:
        return cls(tc.steps, tc.eval_every, tc.save_every, tc.log_every, save_on_eval)


@dataclass
class Outcome:
    state: Any
    step: int
    summary: dict[str, Any] = field(default_factory=dict)
    stopped_by: str | None = None  # 'SIGTERM', 'SIGINT' or 'another host' when a stop request ended the run
    early_stop: str | None = None  # the mode's message when it stopped early


def check_finite(done: int, **values: float) -> None:
    """Stop before anything of a NaN/Inf step is logged or saved."""
    bad = [f"{k} {v}" if k != "params" else "the updated parameters" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise JaxgptError(f"training became non-finite at step {done} ({', '.join(bad)}); stopped without saving it "
                          "(the run dir keeps its last good checkpoint). Lower train.lr or raise train.warmup_steps, "
                          "then run the same command to resume")


def lock(run_dir: str | Path) -> contextlib.AbstractContextManager:
    """One process per run dir: process 0 holds the lock for all hosts."""
    return files.RunDirLock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext()


def _guard(done: int, metrics: dict[str, Any]) -> None:
    values = {k: float(metrics[k]) for k in ("loss", "train_loss", "grad_norm", "val_loss") if k in metrics}
    if not metrics.pop("params_finite", True):
        values["params"] = math.nan
    check_finite(done, **values)


def run(mode: Mode, state, start: int, cadence: Cadence, ckpt: Checkpointer, run_dir: str | Path,
        log_name: str = "metrics.jsonl", progress: bool = False) -> Outcome:
    """Train from `state` (at step `start`) to `cadence.steps`, a stop request or the mode's early stop."""
    is_main = jax.process_index() == 0
    log = MetricsLog(Path(run_dir), start if start else -1, log_name)  # a fresh run's step-0 record is rewritten
    out = Outcome(state, start, {"step": start})
    bar = tqdm(total=cadence.steps, initial=start, disable=not (progress and is_main), dynamic_ncols=True)
    window_time, window_steps = 0.0, 0
    try:
        with StopRequest() as stop:
            first = mode.first_record() if start == 0 else None
            if first:
                log.write(first)
                out.summary.update(first)
            for step in range(start, cadence.steps):
                t0 = time.perf_counter()
                out.state, metrics = mode.step(out.state, step)
                window_time, window_steps = window_time + time.perf_counter() - t0, window_steps + 1
                done = out.step = step + 1
                _guard(done, metrics)
                if step == start:
                    mode.started()
                stopping = distributed.any_process(stop.requested)  # read once: a signal may land mid-step
                scheduled = done % cadence.eval_every == 0 or done == cadence.steps
                save = done % cadence.save_every == 0 or done == cadence.steps or stopping or (
                    cadence.save_on_eval and scheduled)
                record: dict[str, Any] = {}
                if done % cadence.log_every == 0 or scheduled or save:
                    record = {"step": done, **metrics, **mode.speed(window_time / window_steps)}
                    window_time, window_steps = 0.0, 0
                if scheduled or save:
                    record.update(mode.evaluate(out.state, done))
                    _guard(done, {k: v for k, v in record.items() if k == "val_loss"})
                    out.early_stop = mode.after_eval(record, done) if scheduled else None
                if record:
                    log.write(record)
                    out.summary.update(record)
                    bar.set_postfix({k: f"{record[k]:.3f}" for k in mode.postfix if k in record})
                if save or out.early_stop:
                    ckpt.save(done, out.state, record, mode.loop_state())
                bar.update(1)
                if stopping:
                    out.stopped_by = stop.signal_name or "another host"
                    if is_main:
                        print(f"\n{out.stopped_by}: saved step {done}; run the same command to resume", flush=True)
                    break
                if out.early_stop:
                    if is_main:
                        print(f"\n{out.early_stop}", flush=True)
                    break
    finally:
        bar.close()
        log.close()
    out.summary["step"] = out.step
    return out
