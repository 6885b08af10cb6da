"""The Python API: `jaxgpt.load(run_dir)` -> a LanguageModel that generates text and chats.

Classifier run dirs load through `jaxgpt.load_classifier` (jaxgpt.finetune.infer); `load` refuses them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import conversation, rundir
from jaxgpt.config import Config
from jaxgpt.data import tokenizers
from jaxgpt.chat import ChatSession
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import SamplingParams, generate_ids, stream_ids
from jaxgpt.perplexity import PerplexityResult, perplexity
from jaxgpt.score_rows import Score, score_texts
from jaxgpt.scoring import token_logprobs
from jaxgpt.textstream import TextStream, cut_at_stop
from jaxgpt.model import GPT, init_params, merge_lora, param_count, unstack_layers


class LanguageModel:
    """A trained GPT with its tokenizer and chat template. Params are a plain pytree; no hidden state."""

    def __init__(self, cfg: Config, params, tokenizer: tokenizers.Tokenizer, step: int | None = None,
                 template: conversation.Template = conversation.DEFAULT):
        self.cfg, self.params, self.tokenizer, self.step = cfg, params, tokenizer, step
        self.template = template  # the dialogue format it was fine-tuned in (jaxgpt.conversation)

    @property
    def n_params(self) -> int:
        return param_count(self.params)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | list[int] = 0, stop: str | list[str] | None = None,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
                 num_beams: int = 1, stream: bool = False, slide: bool = True):
        """Continue `prompt` (a string, or a list of strings sampled as one batch); returns new text only.

        `seed` may be a list (one per prompt). `stop` strings end a row early and are cut from its text.
        `num_beams` > 1 runs beam search (deterministic). `stream=True` returns an iterator of text pieces
        (lists of pieces for a list of prompts). Past block_size the window slides (its last half becomes the
        next prompt); `slide=False` raises an error instead.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [self.tokenizer.encode(p) for p in prompts]
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        common = dict(eos_id=self.tokenizer.eos_id, n_vocab=self.tokenizer.vocab_size)
        if num_beams < 1:
            raise JaxgptError(f"num_beams must be >= 1 (1 is sampling, > 1 beam search), got {num_beams}")
        if num_beams > 1:
            from jaxgpt.beam import beam_search_ids

            if stream or repetition_penalty != 1.0 or no_repeat_ngram_size or stops:
                raise JaxgptError("num_beams > 1 supports max_new_tokens and min_new_tokens only (no stream, stop, "
                                  "repetition_penalty or no_repeat_ngram_size)")
            new_ids = beam_search_ids(self.params, self.cfg.model, ids, max_new_tokens, num_beams=num_beams,
                                      min_new_tokens=min_new_tokens, **common)
            texts = [self.tokenizer.decode(row) for row in new_ids]
            return texts[0] if isinstance(prompt, str) else texts
        common.update(sampling=SamplingParams(temperature, top_k, top_p, repetition_penalty, min_new_tokens),
                      seed=seed, stop_ids=self._stop_ids(stops), no_repeat_ngram_size=no_repeat_ngram_size,
                      slide=slide)
        if stream:
            pieces = self._stream(ids, max_new_tokens, stops, common)
            return (p[0] for p in pieces) if isinstance(prompt, str) else pieces
        new_ids = generate_ids(self.params, self.cfg.model, ids, max_new_tokens, **common)
        texts = [cut_at_stop(self.tokenizer.decode(row), stops) for row in new_ids]
        return texts[0] if isinstance(prompt, str) else texts

    def _stop_ids(self, stops: list[str]) -> list[list[int]]:
        """Token sequences of the stop strings, so the jitted loop can end rows early (the text cut decides)."""
        out = []
        for s in stops:
            try:
                out.append(self.tokenizer.encode(s))
            except JaxgptError:  # not encodable (e.g. a char outside the vocabulary): the text cut still applies
                pass
        return out

    def _stream(self, ids, max_new_tokens, stops, common) -> Iterator[list[str]]:
        """Text pieces per row as chunks of tokens arrive; a row stops at its first stop string."""
        rows = [TextStream(self.tokenizer.decode, stops) for _ in ids]
        for new in stream_ids(self.params, self.cfg.model, ids, max_new_tokens, **common):
            yield [row.feed(toks) for row, toks in zip(rows, new)]
            if all(row.stopped for row in rows):
                return
        yield [row.feed([], final=True) for row in rows]

    def quantized(self, mode: str = "int8", embeddings: bool = True) -> LanguageModel:
        """A copy with int8 matmul weights (per-output-channel scales), dequantized under jit (jaxgpt.quantize)."""
        from jaxgpt.quantize import quantize_params

        return LanguageModel(self.cfg, quantize_params(self.params, mode, embeddings), self.tokenizer, self.step,
                             self.template)

    def chat_session(self, system: str | None = None) -> ChatSession:
        """A multi-turn conversation that reuses its KV cache: `.send(user_text, **sampling) -> reply`."""
        return ChatSession(self.params, self.cfg.model, self.tokenizer, system=system, template=self.template)

    def perplexity(self, text: str, stride: int | None = None, window: int | None = None) -> PerplexityResult:
        """Sliding-window perplexity of `text` (see jaxgpt.perplexity)."""
        return perplexity(self.params, self.cfg.model, self.tokenizer.encode(text), stride=stride, window=window,
                          n_vocab=self.tokenizer.vocab_size)

    def score(self, context: str | list[str], continuation: str | list[str]) -> Score | list[Score]:
        """log p(continuation | context) summed over its tokens, and whether greedy decoding gives it.

        lm-evaluation-harness's loglikelihood: lists in, lists out (one batch). Context and continuation are
        encoded separately and joined; an empty context starts from end-of-text. Log-probabilities are
        float32 from the forward pass `logits` runs (see jaxgpt.scoring).
        """
        return score_texts(self.tokenizer, self.cfg.model.block_size, context, continuation,
                           lambda rows: token_logprobs(self.params, self.cfg.model, rows,
                                                       n_vocab=self.tokenizer.vocab_size))

    def logits(self, text: str) -> np.ndarray:
        """TxV next-token logits for every position of `text` (float32)."""
        tokens = np.asarray([self.tokenizer.encode(text)], np.int32)
        if tokens.shape[1] > self.cfg.model.block_size:
            raise JaxgptError(f"text is {tokens.shape[1]} tokens, longer than the model's context of "
                              f"{self.cfg.model.block_size}; shorten it, or score long texts with perplexity() "
                              "(`jaxgpt perplexity`)")
        return np.asarray(_forward(self.cfg.model)(self.params, tokens)[0])


@functools.lru_cache(maxsize=16)
def _forward(cfg):
    """One jitted full forward per model config (recompiled only per text length)."""
    return jax.jit(lambda params, tokens_BxT: GPT(cfg).apply({"params": params}, tokens_BxT)[0])


def load(run_dir: str | Path, checkpoint: str = "best", quantize: str | None = None) -> LanguageModel:
    """Load a language-model run dir (pretrained, SFT, RL, DPO) for inference; `checkpoint` is 'best'
    (lowest val loss), 'latest' or a step. A classifier run dir is an error: use `load_classifier`.

    `quantize="int8"` stores the matmul weights as int8 (`LanguageModel.quantized`).
    """
    model = _load(Path(run_dir), checkpoint)
    return model.quantized(quantize) if quantize else model


def _load(run_dir: Path, checkpoint: str) -> LanguageModel:
    cfg = rundir.resolve_config(run_dir, None)
    rundir.check_kind(run_dir, cfg, rundir.LANGUAGE_MODEL)
    tok = tokenizers.load(run_dir / "tokenizer")
    template = conversation.for_run(run_dir)
    if isinstance(cfg, config_lib.FinetuneRunConfig):  # SFT: its {"gpt"} params, any LoRA adapters merged for serving
        from jaxgpt.finetune.infer import load_params

        cfg, params, meta = load_params(run_dir, checkpoint)
        gpt = params["gpt"]
        if cfg.model.lora_rank:
            gpt = merge_lora(gpt, cfg.model)
            cfg = config_lib.replace(cfg, **{"model.lora_rank": 0})
        return LanguageModel(cfg, gpt, tok, meta["step"], template)
    from jaxgpt.train.checkpoint import restore_params

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
    params, step = restore_params(run_dir, abstract, checkpoint)
    if cfg.model.scan_layers:  # decoding runs unrolled layers
        params = unstack_layers(params, cfg.model.n_layer)
        cfg = config_lib.replace(cfg, **{"model.scan_layers": False})
    return LanguageModel(cfg, params, tok, step, template)


__all__ = ["LanguageModel", "load", "Config", "config_lib"]
