"""The pretraining loop: data -> jitted sharded steps -> metrics, evaluation and checkpoints.

Running it again on the same run dir resumes from the newest good checkpoint; because batches and
dropout are pure functions of (seed, step), the resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

from jaxgpt import config as config_lib
from jaxgpt import distributed, files, rundir, sharding
from jaxgpt.config import Config, TrainConfig
from jaxgpt.data import corpus
from jaxgpt.errors import JaxgptError
from jaxgpt.model import flops_per_token, param_count, validate
from jaxgpt.perf import peak_flops_per_device
from jaxgpt.precision import describe_auto
from jaxgpt.train.checkpoint import Checkpointer
from jaxgpt.train.metrics_log import MetricsLog
from jaxgpt.train import sharded
from jaxgpt.train.signals import StopRequest


def check_train_config(cfg: TrainConfig) -> None:
    positive = ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "log_every")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise JaxgptError(f"train.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.grad_accum:
        raise JaxgptError(f"train.batch_size ({cfg.batch_size}) must be divisible by train.grad_accum ({cfg.grad_accum})")
    if not cfg.lr > 0:
        raise JaxgptError(f"train.lr must be positive, got {cfg.lr}")


class Trainer:
    """Holds the compiled functions and shardings of one run; `run()` trains to cfg.train.steps."""

    def __init__(self, cfg: Config, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        cfg = rundir.resolve_config(self.run_dir, cfg)
        # Check everything that can be checked before the run dir is touched: a bad value leaves nothing behind.
        check_train_config(cfg.train)
        validate(dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 1))  # vocab: from the tokenizer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Process 0 fits the tokenizer into the (shared) run dir; the other hosts then read it.
        if jax.process_index() == 0:
            rundir.tokenizer_for(cfg, self.run_dir)
        distributed.barrier("tokenizer")
        tok = rundir.tokenizer_for(cfg, self.run_dir)
        cfg = rundir.with_vocab(cfg, tok)
        validate(cfg.model)
        self.cfg, self.tokenizer = cfg, tok
        self.data = corpus.prepare(cfg.data, tok)

        self.mesh = sharding.make_mesh(cfg.mesh)
        self.init_rng, self.dropout_rng = jax.random.split(jax.random.key(cfg.seed))
        self.fns = sharded.build(cfg.model, cfg.train, self.mesh, self.init_rng)
        rows = sharding.host_rows(self.mesh, cfg.train.batch_size)
        T, B = cfg.model.block_size, cfg.train.batch_size
        self.train_batches = corpus.WindowSampler(self.data.train, T, B, cfg.seed, rows, "train")
        self.val_batches = corpus.WindowSampler(self.data.val, T, B, cfg.seed + 1, rows, "validation")

    def evaluate(self, params) -> float:
        B = self.cfg.train.batch_size
        losses = [self.fns.eval(params, sharding.global_batch(self.val_batches(i), self.mesh, B))
                  for i in range(self.cfg.train.eval_batches)]
        return float(np.mean(jax.device_get(losses)))

    def run(self) -> dict[str, Any]:
        tc = self.cfg.train
        ckpt = Checkpointer(self.run_dir)
        try:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES), StopRequest() as stop:
                state = ckpt.restore_latest(self.fns.abstract_state)
                if state is None:
                    state = self.fns.init(self.init_rng)
                start = int(state["step"])
                if start >= tc.steps:
                    print(f"run dir already trained to step {start} (train.steps={tc.steps}); "
                          "raise train.steps to continue")
                    return {"step": start}
                return self._loop(state, start, ckpt, stop)
        finally:
            ckpt.close()

    def _loop(self, state, start: int, ckpt: Checkpointer, stop: StopRequest) -> dict[str, Any]:
        cfg, tc = self.cfg, self.cfg.train
        log = MetricsLog(self.run_dir, start)
        is_main = jax.process_index() == 0
        tokens_per_step = tc.batch_size * cfg.model.block_size
        peak, _ = peak_flops_per_device(config_lib.dtype_of(cfg.model.dtype))
        flops_per_step = flops_per_token(cfg.model) * tokens_per_step
        n_params = param_count(state["params"])
        if is_main:
            print(f"jaxgpt: {n_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}, "
                  f"steps {start}->{tc.steps}, {tokens_per_step} tokens/step")
            if cfg.model.dtype == "auto":
                print(f"jaxgpt: {describe_auto()}")
        bar = tqdm(total=tc.steps, initial=start, disable=not (tc.progress and is_main), dynamic_ncols=True)
        stream = corpus.batch_stream(self.train_batches, start, tc.steps)
        summary: dict[str, Any] = {"step": start}
        window_time, window_steps = 0.0, 0
        try:
            for step in range(start, tc.steps):
                t0 = time.perf_counter()
                batch = sharding.global_batch(next(stream), self.mesh, tc.batch_size)
                state, metrics = self.fns.step(state, batch, self.dropout_rng)
                loss = float(metrics["loss"])  # one host sync per step also guards against NaN at once
                window_time += time.perf_counter() - t0
                window_steps += 1
                done = step + 1
                _check_finite(done, loss=loss, grad_norm=float(metrics["grad_norm"]),
                              params=1.0 if bool(metrics.get("params_finite", True)) else math.nan)
                if step == start and is_main:
                    # Only now, with a step that ran, does the run dir become a run: a failed start leaves no
                    # config.json to block the corrected command.
                    config_lib.save_json(cfg, rundir.config_path(self.run_dir))
                stopping = distributed.any_process(stop.requested)
                is_last = done == tc.steps or stopping
                evaluate = done % tc.eval_every == 0 or done % tc.save_every == 0 or is_last
                record: dict[str, Any] = {}
                if done % tc.log_every == 0 or evaluate:
                    tps = window_steps * tokens_per_step / window_time
                    record = {"step": done, "train_loss": loss, "lr": float(metrics["lr"]),
                              "grad_norm": float(metrics["grad_norm"]), "tokens_per_sec": tps,
                              "mfu": flops_per_step * window_steps / window_time / (peak * jax.device_count())}
                    window_time, window_steps = 0.0, 0
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * record['mfu']:.0f}%")
                if evaluate:
                    record["val_loss"] = self.evaluate(state["params"])
                    _check_finite(done, val_loss=record["val_loss"])
                    summary["val_loss"] = record["val_loss"]
                if record:
                    log.write(record)
                    summary.update(record)
                if done % tc.save_every == 0 or is_last:
                    ckpt.save(done, state, record["val_loss"])
                bar.update(1)
                if stopping:
                    if is_main:
                        print(f"\n{stop.signal_name or 'stop on another host'}: saved step {done}; "
                              "run the same command to resume")
                    break
        finally:
            bar.close()
            log.close()
        summary["step"] = done
        summary["params"] = n_params
        return summary


def _check_finite(done: int, **values: float) -> None:
    """Stop before anything of a NaN/Inf step is logged or saved."""
    bad = [f"{k} {v}" if k != "params" else "the updated parameters" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise JaxgptError(f"training became non-finite at step {done} ({', '.join(bad)}); stopped without saving it "
                          "(the run dir keeps its last good checkpoint). Lower train.lr or raise train.warmup_steps, "
                          "then run the same command to resume")


def train(cfg: Config | None, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; `cfg` None resumes with the saved config."""
    if jax.process_index() != 0:  # one lock per run dir: process 0 holds it for all hosts
        return Trainer(cfg, run_dir).run()
    with files.RunDirLock(run_dir):
        return Trainer(cfg, run_dir).run()
