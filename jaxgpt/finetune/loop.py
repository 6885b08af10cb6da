"""The fine-tune loop: pretrained run -> task data -> jitted steps -> validation, selection, test.

A fine-tune run dir holds config.json (the pretrained model's config plus `train.*` and `finetune.*`),
tokenizer/ (copied), chat_template.json (SFT: the dialogue format it was trained in), checkpoints/
(the latest two and the best by the selection metric, with optimizer, early-stopping and plateau state),
metrics.jsonl and, at the end, test_metrics.json for the best checkpoint. Running the same command again on
an interrupted run dir continues it; the resumed metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxgpt import config as config_lib
from jaxgpt import conversation, rundir, sharding
from jaxgpt.config import FinetuneRunConfig
from jaxgpt.data import tokenizers
from jaxgpt.errors import JaxgptError
from jaxgpt.finetune import batches as batch_lib
from jaxgpt.finetune import evaluate as eval_lib
from jaxgpt.finetune import optim, step as step_lib
from jaxgpt.finetune.data import TaskData, describe, load_task
from jaxgpt.finetune.heads import POOLINGS, init_head
from jaxgpt.finetune.metrics import EarlyStopping, selection_metric
from jaxgpt.model import init_params, validate
from jaxgpt.train import runner
from jaxgpt.train.checkpoint import Checkpointer, restore_params

# Model keys a fine-tune may change; the architecture comes from the pretrained run.
MODEL_KEYS = ("dropout", "lora_rank", "lora_alpha", "lora_targets", "dtype", "remat", "attention")


def load_config(path: str | None, overrides: list[str], init_from: str | None) -> FinetuneRunConfig:
    """Pretrained run's model/data/seed + the fine-tune YAML and overrides (train.*, finetune.*, a few model.*)."""
    flat = config_lib.read_yaml(path) if path else {}
    flat.update(config_lib.parse_overrides(overrides))
    return config_from_flat(flat, init_from)


def config_from_flat(flat: dict[str, Any], init_from: str | None) -> FinetuneRunConfig:
    """load_config's merge, from an already flattened {dotted key: value} dict."""
    init_from = init_from or flat.get("finetune.init_from", "")
    base = rundir.pretrained_base(init_from, flat, MODEL_KEYS, "finetune")
    return config_lib.build({**base, **flat, "finetune.init_from": str(init_from)}, FinetuneRunConfig)


def _class_weights(spec: str, labels: list[str], label_N: np.ndarray) -> np.ndarray:
    C = len(labels)
    if not spec:
        return np.ones(C, np.float32)
    if spec == "balanced":  # inverse frequency, mean 1 over examples
        counts = np.bincount(label_N, minlength=C).astype(np.float32)
        return np.where(counts > 0, len(label_N) / (C * np.maximum(counts, 1)), 0.0).astype(np.float32)
    try:
        weights = np.asarray([float(w) for w in spec.split(",")], np.float32)
    except ValueError:
        raise JaxgptError(f"finetune.class_weights '{spec}' must be 'balanced' or numbers") from None
    if len(weights) != C:
        raise JaxgptError(f"finetune.class_weights has {len(weights)} numbers for {C} classes ({', '.join(labels)})")
    return weights


def initial_params(cfg: FinetuneRunConfig, n_classes: int, rng: jax.Array):
    """{"gpt": pretrained weights (+ fresh LoRA adapters), "head": new head} or a random init (from_scratch)."""
    init_rng, head_rng = jax.random.split(rng)
    gpt = init_params(cfg.model, init_rng)
    if not cfg.finetune.from_scratch:
        base_cfg = config_lib.replace(cfg, **{"model.lora_rank": 0}).model
        abstract = jax.eval_shape(lambda: init_params(base_cfg, jax.random.key(0)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        pretrained, _ = restore_params(cfg.finetune.init_from, abstract, "best")
        gpt = _overlay(gpt, pretrained)
    params = {"gpt": gpt}
    if n_classes:
        params["head"] = init_head(head_rng, cfg.model.n_embd, n_classes)
    return params


def _overlay(fresh: dict, pretrained: dict) -> dict:
    # Pretrained values wherever the pretrained tree has the key; LoRA adapters keep their fresh init.
    return {k: (_overlay(v, pretrained[k]) if isinstance(v, dict) else pretrained[k]) if k in pretrained else v
            for k, v in fresh.items()}


def check(cfg: FinetuneRunConfig) -> None:
    ft, tc = cfg.finetune, cfg.train
    if ft.pooling not in POOLINGS:
        raise JaxgptError(f"finetune.pooling must be one of {', '.join(POOLINGS)}, got '{ft.pooling}'")
    for name in ("steps", "batch_size", "eval_every", "log_every"):
        if getattr(tc, name) <= 0:
            raise JaxgptError(f"train.{name} must be positive, got {getattr(tc, name)}")
    if not 0 <= ft.plateau_factor < 1:
        raise JaxgptError(f"finetune.plateau_factor must be in [0, 1), got {ft.plateau_factor}")
    if ft.max_len > cfg.model.block_size:
        raise JaxgptError(f"finetune.max_len ({ft.max_len}) exceeds model.block_size ({cfg.model.block_size}); lower "
                          "finetune.max_len (0 means the whole context)")


def _check_resumable(run_dir: Path, cfg: FinetuneRunConfig) -> None:
    """Running again on a fine-tune run dir continues it, with the same task and settings (train.* may change)."""
    saved_file = rundir.config_path(run_dir)
    if not saved_file.is_file():
        return
    saved = config_lib.load_json(saved_file)
    if not isinstance(saved, FinetuneRunConfig):
        raise JaxgptError(f"'{run_dir}' is a pretrained run dir, not a fine-tune; pass a new --run-dir")
    rundir.resolve_config(run_dir, cfg)  # model, data and seed
    for name in ("init_from", "source", "from_scratch", "freeze", "pooling", "metric", "max_len"):
        a, b = getattr(saved.finetune, name), getattr(cfg.finetune, name)
        if a != b:
            raise JaxgptError(f"run dir '{run_dir}' was started with finetune.{name}={a!r}, not {b!r}; use the same "
                              "value to resume or a new --run-dir")


class FineTuner:
    def __init__(self, cfg: FinetuneRunConfig, run_dir: str | Path, task: TaskData | None = None):
        """`task`: already loaded task data (e.g. a labelled subset); by default read from cfg.finetune.
        A run dir that holds an interrupted fine-tune is continued."""
        self.run_dir = Path(run_dir)
        check(cfg)
        validate(cfg.model)
        self.tok = tokenizers.load(Path(cfg.finetune.init_from) / "tokenizer")
        self.task = task or load_task(cfg.finetune)
        ft = cfg.finetune
        cfg = config_lib.replace(cfg, **{"finetune.task": self.task.task, "finetune.labels": ",".join(self.task.labels)})
        _check_resumable(self.run_dir, cfg)
        self.cfg = cfg
        self.max_len = ft.max_len or cfg.model.block_size
        self.metric, self.mode = selection_metric(self.task.task, ft.metric)
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rows = sharding.host_rows(self.mesh, cfg.train.batch_size)  # this host loads only these rows
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(Path(ft.init_from) / "tokenizer", self.run_dir / "tokenizer", dirs_exist_ok=True)
        config_lib.save_json(cfg, self.run_dir / "config.json")
        # SFT records its dialogue format, so chat and serving use the ids it was trained on.
        self.template = conversation.for_run(ft.init_from)
        if self.task.task == "sft":
            conversation.save(self.template, self.run_dir)
        (self.run_dir / "task.json").write_text(json.dumps(describe(self.task), indent=1) + "\n")
        enc = {s: batch_lib.encode(self.task.split(s), self.task.task, self.tok, self.max_len, self.task.labels,
                                   self.template) for s in ("train", "val")}
        self.enc = enc

    def run(self) -> dict[str, Any]:
        with runner.lock(self.run_dir):
            return self._run()

    def _run(self) -> dict[str, Any]:
        cfg, ft, tc, task = self.cfg, self.cfg.finetune, self.cfg.train, self.task
        init_rng, self.dropout_rng = jax.random.split(jax.random.key(cfg.seed))
        params = initial_params(cfg, len(task.labels), init_rng)
        trainable = optim.trainable_tree(params, cfg.model, ft)
        tx, lr_schedule = optim.make_optimizer(tc, cfg.model, ft, params, trainable)
        class_w = _class_weights(ft.class_weights, task.labels, self.enc["train"].label_N) if task.task == "classify" \
            else np.ones(1, np.float32)
        self.steps = step_lib.build(cfg.model, task.task, ft.pooling, class_w, tx, lr_schedule, trainable, self.mesh,
                                     params, tc.loss_chunk)
        n_train, n_total = optim.count(params, trainable)
        print(f"jaxgpt finetune: {task.task} on {ft.source} ({len(task.train)} train / {len(task.val)} val / "
              f"{len(task.test)} test), {n_train / 1e6:.3f}M of {n_total / 1e6:.2f}M parameters trainable "
              f"({100 * n_train / n_total:.2f}%), selecting by val {self.metric}")
        self.plateau = optax.contrib.reduce_on_plateau(factor=ft.plateau_factor, patience=ft.plateau_patience) \
            if ft.plateau_factor > 0 else None
        self.plateau_state = self.plateau.init({}) if self.plateau else None
        self.stopper = EarlyStopping(ft.patience, ft.min_delta, self.mode)
        self.early_stopped = False
        summary: dict[str, Any] = {"trainable_params": n_train, "total_params": n_total}
        t_start = time.perf_counter()
        ckpt = Checkpointer(self.run_dir, f"val_{self.metric}", self.mode)
        try:
            with jax.set_mesh(self.mesh), step_lib.rules():
                state = step_lib.init_state(params, tx, self.steps.state_shardings)
                abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
                restored = ckpt.restore_latest(abstract)
                if restored is not None:
                    state = restored
                    self.load_loop_state(ckpt.loop_state)
                start = int(state["step"])
                if start:
                    print(f"jaxgpt finetune: resuming from step {start}")
                out = None
                if start < tc.steps and not self.early_stopped:
                    self.stream = batch_lib.train_batches(self.enc["train"], tc.batch_size, self.max_len,
                                                          self.tok.eos_id, cfg.seed, start, self.rows)
                    out = runner.run(_FineTuning(self), state, start, runner.Cadence.of(tc, save_on_eval=True),
                                     ckpt, self.run_dir, progress=tc.progress)
                    summary.update(out.summary)
        finally:
            ckpt.close()
        summary.update(step=out.step if out else start, best_step=self.stopper.best_step, best_val=self.stopper.best,
                       seconds=round(time.perf_counter() - t_start, 1))
        if out and out.stopped_by:
            summary["stopped_by"] = out.stopped_by  # unfinished: the test split waits for the resumed run's best
        elif task.test:
            summary["test"] = evaluate_run(self.run_dir, "test", task=task)
        return summary

    def loop_state(self) -> dict[str, Any]:
        plateau = [np.asarray(x).item() for x in jax.tree.leaves(self.plateau_state)] if self.plateau else None
        return {"best": self.stopper.best, "best_step": self.stopper.best_step, "bad_evals": self.stopper.bad_evals,
                "plateau": plateau, "early_stopped": self.early_stopped}

    def load_loop_state(self, saved: dict[str, Any]) -> None:
        if not saved:
            return
        self.stopper.best, self.stopper.best_step, self.stopper.bad_evals = \
            saved["best"], saved["best_step"], saved["bad_evals"]
        self.early_stopped = saved["early_stopped"]
        if self.plateau and saved["plateau"] is not None:
            leaves, tree = jax.tree.flatten(self.plateau_state)
            self.plateau_state = jax.tree.unflatten(tree, [jax.numpy.asarray(v, np.asarray(x).dtype)
                                                           for v, x in zip(saved["plateau"], leaves)])


class _FineTuning(runner.Mode):
    """Batches, dropout and the LR scale are functions of (seed, step) and the saved loop state."""

    def __init__(self, ft: FineTuner):
        self.ft = ft

    def step(self, state, step: int):
        ft = self.ft
        lr_scale = np.float32(ft.plateau_state.scale) if ft.plateau else np.float32(1.0)
        batch = sharding.global_batch(next(ft.stream), ft.mesh, ft.cfg.train.batch_size)
        state, m = ft.steps.step(state, batch, ft.dropout_rng, lr_scale)
        return state, {"train_loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"])}

    def evaluate(self, state, step: int) -> dict[str, float]:
        ft = self.ft
        val = eval_lib.evaluate(ft.cfg, ft.steps.eval, state["params"], ft.task, "val", ft.enc["val"], ft.tok,
                                ft.max_len, ft.steps.put_eval, ft.template)
        return {f"val_{k}": v for k, v in val.items()}

    def after_eval(self, record: dict[str, Any], step: int) -> str | None:
        ft, settings = self.ft, self.ft.cfg.finetune
        stop = ft.stopper.update(record[f"val_{ft.metric}"], step)
        if ft.plateau:
            _, ft.plateau_state = ft.plateau.update({}, ft.plateau_state, value=record["val_loss"])
        if not stop:
            return None
        ft.early_stopped = True
        return (f"early stop at step {step}: val {ft.metric} has not improved by more than {settings.min_delta} for "
                f"{settings.patience} evaluations (best {ft.stopper.best:.4f} at step {ft.stopper.best_step})")

    def loop_state(self) -> dict[str, Any]:
        return self.ft.loop_state()


def finetune(cfg: FinetuneRunConfig, run_dir: str | Path) -> dict[str, Any]:
    """Fine-tune `cfg.finetune.init_from` on the task; returns the summary (with test metrics)."""
    return FineTuner(cfg, run_dir).run()


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best", task=None) -> dict[str, float]:
    """Evaluate a fine-tune run's checkpoint on a split; writes RUN_DIR/{split}_metrics.json."""
    from jaxgpt.finetune.infer import load_params

    run_dir = Path(run_dir)
    if not isinstance(rundir.resolve_config(run_dir, None), FinetuneRunConfig):
        raise JaxgptError(f"'{run_dir}' is a pretrained run dir, not a fine-tune; `jaxgpt evaluate` takes the run "
                          "dir of `jaxgpt finetune` (for a language model's loss on text use `jaxgpt perplexity`)")
    cfg, params, meta = load_params(run_dir, checkpoint)
    task = task or load_task(cfg.finetune)
    examples = task.split(split)
    if not examples:
        raise JaxgptError(f"the task has no '{split}' examples; set finetune.test_source or use --split val")
    tok = tokenizers.load(run_dir / "tokenizer")
    max_len = cfg.finetune.max_len or cfg.model.block_size
    template = conversation.for_run(run_dir)
    enc = batch_lib.encode(examples, task.task, tok, max_len, task.labels, template)
    mesh = sharding.make_mesh(cfg.mesh)
    eval_step = jax.jit(step_lib.make_eval_step(cfg.model, task.task, cfg.finetune.pooling, cfg.train.loss_chunk))

    def put(batch):
        return {k: jax.device_put(v) for k, v in batch.items()}

    with jax.set_mesh(mesh), step_lib.rules():
        metrics = eval_lib.evaluate(cfg, eval_step, params, task, split, enc, tok, max_len, put, template)
    metrics = {"step": meta["step"], "n": len(examples), **metrics}
    (run_dir / f"{split}_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
