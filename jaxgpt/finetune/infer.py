"""Loading a fine-tune run: its params (`load_params`), and a classifier run as a `Classifier`.

SFT runs are language models: `jaxgpt.load` (jaxgpt.api) loads them with the params read here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import rundir
from jaxgpt.config import FinetuneRunConfig
from jaxgpt.data import tokenizers
from jaxgpt.finetune.batches import encode, eval_batches
from jaxgpt.finetune.data import Example
from jaxgpt.finetune.heads import class_logits, init_head
from jaxgpt.model import init_params
from jaxgpt.train.checkpoint import restore_params


def load_params(run_dir: str | Path, checkpoint: str = "best") -> tuple[FinetuneRunConfig, Any, dict]:
    """(config, {"gpt", "head"?} params, checkpoint meta) of a fine-tune run dir."""
    run_dir = Path(run_dir)
    cfg = config_lib.load_json(run_dir / "config.json")
    labels = [s for s in cfg.finetune.labels.split(",") if s]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def shapes():
        params = {"gpt": init_params(cfg.model, jax.random.key(0))}
        if cfg.finetune.task == "classify":
            params["head"] = init_head(jax.random.key(0), cfg.model.n_embd, len(labels))
        return params

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), jax.eval_shape(shapes))
    params, step = restore_params(run_dir, abstract, checkpoint)
    return cfg, params, {"step": step}


class Classifier:
    """A fine-tuned sequence classifier: `classify(texts)` -> (labels, NxC probabilities)."""

    def __init__(self, cfg: FinetuneRunConfig, params, tokenizer: tokenizers.Tokenizer, step: int | None = None):
        self.cfg, self.params, self.tokenizer, self.step = cfg, params, tokenizer, step
        self.labels = [s for s in cfg.finetune.labels.split(",") if s]
        self.max_len = cfg.finetune.max_len or cfg.model.block_size
        model_cfg, pooling = cfg.model, cfg.finetune.pooling
        self._logits = jax.jit(lambda p, b: class_logits(model_cfg, p, b["tokens"], b["start"], pooling))

    def classify(self, texts: str | list[str], batch_size: int = 16) -> tuple[list[str], np.ndarray]:
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        enc = encode([Example("input", text=t, label=self.labels[0]) for t in texts], "classify", self.tokenizer,
                     self.max_len, self.labels)
        logits_NxC = np.zeros((len(texts), len(self.labels)), np.float32)
        for rows, batch in eval_batches(enc, batch_size, self.max_len, self.tokenizer.eos_id):
            logits_NxC[rows] = np.asarray(self._logits(self.params, batch))[:len(rows)]
        probs_NxC = np.exp(logits_NxC - logits_NxC.max(1, keepdims=True))
        probs_NxC /= probs_NxC.sum(1, keepdims=True)
        labels = [self.labels[i] for i in probs_NxC.argmax(1)]
        return (labels[0], probs_NxC[0]) if single else (labels, probs_NxC)


def load_classifier(run_dir: str | Path, checkpoint: str = "best") -> Classifier:
    """A `jaxgpt finetune finetune.task=classify` run dir as a Classifier; other run dirs are an error."""
    run_dir = Path(run_dir)
    rundir.check_kind(run_dir, rundir.resolve_config(run_dir, None), rundir.CLASSIFIER)
    cfg, params, meta = load_params(run_dir, checkpoint)
    return Classifier(cfg, params, tokenizers.load(run_dir / "tokenizer"), meta["step"])
