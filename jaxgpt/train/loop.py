"""The pretraining loop: data -> jitted sharded steps -> metrics, evaluation and checkpoints.

Running it again on the same run dir resumes from the newest good checkpoint; because batches and
dropout are pure functions of (seed, step), the resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import distributed, rundir, sharding
from jaxgpt.config import Config, TrainConfig
from jaxgpt.data import corpus
from jaxgpt.errors import JaxgptError
from jaxgpt.model import flops_per_token, param_count, validate
from jaxgpt.perf import peak_flops_per_device
from jaxgpt.precision import describe_auto
from jaxgpt.train.checkpoint import Checkpointer
from jaxgpt.train import runner, sharded


def check_train_config(cfg: TrainConfig) -> None:
    positive = ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "log_every")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise JaxgptError(f"train.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.grad_accum:
        raise JaxgptError(f"train.batch_size ({cfg.batch_size}) must be divisible by train.grad_accum ({cfg.grad_accum})")
    if not cfg.lr > 0:
        raise JaxgptError(f"train.lr must be positive, got {cfg.lr}")
    if cfg.loss_chunk < 0:
        raise JaxgptError(f"train.loss_chunk must be >= 0 (0 computes the loss unchunked), got {cfg.loss_chunk}")


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
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
                state = ckpt.restore_latest(self.fns.abstract_state)
                if state is None:
                    state = self.fns.init(self.init_rng)
                start = int(state["step"])
                if start >= tc.steps:
                    print(f"run dir already trained to step {start} (train.steps={tc.steps}); "
                          "raise train.steps to continue")
                    return {"step": start}
                n_params = param_count(state["params"])
                if jax.process_index() == 0:
                    print(f"jaxgpt: {n_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}, "
                          f"steps {start}->{tc.steps}, {tc.batch_size * self.cfg.model.block_size} tokens/step")
                    if self.cfg.model.dtype == "auto":
                        print(f"jaxgpt: {describe_auto()}")
                out = runner.run(Pretraining(self, start), state, start, runner.Cadence.of(tc), ckpt, self.run_dir,
                                 progress=tc.progress)
                return {**out.summary, "params": n_params}
        finally:
            ckpt.close()


class Pretraining(runner.Mode):
    """Batches and dropout are functions of (seed, step): a resumed run reproduces the uninterrupted one."""

    postfix = ("train_loss",)

    def __init__(self, trainer: Trainer, start: int):
        self.t, tc, model = trainer, trainer.cfg.train, trainer.cfg.model
        self.stream = corpus.batch_stream(trainer.train_batches, start, tc.steps)
        self.tokens_per_step = tc.batch_size * model.block_size
        self.flops_per_step = flops_per_token(model) * self.tokens_per_step
        self.peak = peak_flops_per_device(config_lib.dtype_of(model.dtype))[0] * jax.device_count()

    def step(self, state, step: int):
        batch = sharding.global_batch(next(self.stream), self.t.mesh, self.t.cfg.train.batch_size)
        state, m = self.t.fns.step(state, batch, self.t.dropout_rng)
        # One host sync per step also lets the runner refuse a NaN at once.
        return state, {"train_loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                       "params_finite": bool(m.get("params_finite", True))}

    def evaluate(self, state, step: int) -> dict[str, float]:
        return {"val_loss": self.t.evaluate(state["params"])}

    def started(self) -> None:
        # Only now, with a step that ran, does the run dir become a run: a failed start leaves no config.json
        # to block the corrected command.
        if jax.process_index() == 0:
            config_lib.save_json(self.t.cfg, rundir.config_path(self.t.run_dir))

    def speed(self, seconds_per_step: float) -> dict[str, float]:
        return {"tokens_per_sec": self.tokens_per_step / seconds_per_step,
                "mfu": self.flops_per_step / seconds_per_step / self.peak}


def train(cfg: Config | None, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; `cfg` None resumes with the saved config."""
    with runner.lock(run_dir):
        return Trainer(cfg, run_dir).run()
