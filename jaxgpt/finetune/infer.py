"""Loading a fine-tune run for inference: a classifier with `.classify(texts)`, or an SFT language model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt.config import Config
from jaxgpt.data import tokenizers
from jaxgpt.finetune.batches import encode, eval_batches
from jaxgpt.finetune.checkpoint import BestCheckpoints
from jaxgpt.finetune.data import Example
from jaxgpt.finetune.heads import class_logits, init_head
from jaxgpt.finetune.metrics import selection_metric
from jaxgpt.model import init_params, merge_lora


def load_params(run_dir: str | Path, checkpoint: str = "best") -> tuple[Config, Any, dict]:
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
    metric, mode = selection_metric(cfg.finetune.task, cfg.finetune.metric)
    ckpt = BestCheckpoints(run_dir, metric, mode, read_only=True)
    try:
        params, meta = ckpt.restore(abstract, checkpoint)
    finally:
        ckpt.close()
    return cfg, params, meta


class Classifier:
    """A fine-tuned sequence classifier: `classify(texts)` -> (labels, NxC probabilities)."""

    def __init__(self, cfg: Config, params, tokenizer: tokenizers.Tokenizer, step: int | None = None):
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


def load_finetuned(run_dir: str | Path, checkpoint: str = "best"):
    """A Classifier, or for an SFT run a LanguageModel with any LoRA adapters merged into the kernels."""
    from jaxgpt.api import LanguageModel

    cfg, params, meta = load_params(run_dir, checkpoint)
    tok = tokenizers.load(Path(run_dir) / "tokenizer")
    if cfg.finetune.task == "classify":
        return Classifier(cfg, params, tok, meta["step"])
    gpt = params["gpt"]
    if cfg.model.lora_rank:
        gpt = merge_lora(gpt, cfg.model)
        cfg = config_lib.replace(cfg, **{"model.lora_rank": 0})
    return LanguageModel(cfg, gpt, tok, meta["step"])
