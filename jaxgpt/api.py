"""The Python API: `jaxgpt.load(run_dir)` -> a model that generates text."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import rundir
from jaxgpt.config import Config
from jaxgpt.data import tokenizers
from jaxgpt.generate import SamplingParams, generate_ids
from jaxgpt.model import GPT, init_params, param_count, unstack_layers


class LanguageModel:
    """A trained GPT with its tokenizer. Params are a plain pytree; nothing here holds hidden state."""

    def __init__(self, cfg: Config, params, tokenizer: tokenizers.Tokenizer, step: int | None = None):
        self.cfg, self.params, self.tokenizer, self.step = cfg, params, tokenizer, step

    @property
    def n_params(self) -> int:
        return param_count(self.params)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str | list[str] | None = None
                 ) -> str | list[str]:
        """Continue `prompt` (a string, or a list of strings sampled as one batch); returns new text only."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [self.tokenizer.encode(p) for p in prompts]
        new_ids = generate_ids(self.params, self.cfg.model, ids, max_new_tokens, eos_id=self.tokenizer.eos_id,
                               n_vocab=self.tokenizer.vocab_size,
                               sampling=SamplingParams(temperature, top_k, top_p), seed=seed)
        texts = [_cut_at_stop(self.tokenizer.decode(row), stop) for row in new_ids]
        return texts[0] if isinstance(prompt, str) else texts

    def logits(self, text: str) -> np.ndarray:
        """TxV next-token logits for every position of `text` (float32)."""
        tokens = np.asarray([self.tokenizer.encode(text)], np.int32)
        logits, _ = GPT(self.cfg.model).apply({"params": self.params}, tokens)
        return np.asarray(logits[0])


def _cut_at_stop(text: str, stop: str | list[str] | None) -> str:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    cuts = [text.index(s) for s in stops if s and s in text]
    return text[:min(cuts)] if cuts else text


def load(run_dir: str | Path, checkpoint: str = "best") -> LanguageModel:
    """Load a run dir for inference; `checkpoint` is 'best' (lowest val loss), 'latest' or a step."""
    from jaxgpt.train.checkpoint import restore_params

    run_dir = Path(run_dir)
    cfg = rundir.resolve_config(run_dir, None)
    tok = tokenizers.load(run_dir / "tokenizer")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
    params, step = restore_params(run_dir, abstract, checkpoint)
    if cfg.model.scan_layers:  # decoding runs unrolled layers
        params = unstack_layers(params, cfg.model.n_layer)
        cfg = config_lib.replace(cfg, **{"model.scan_layers": False})
    return LanguageModel(cfg, params, tok, step)


__all__ = ["LanguageModel", "load", "Config", "config_lib"]
