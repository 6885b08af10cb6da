"""Evaluate params on one split: loss, accuracy and macro-F1 (classify) or loss, exact match, ROUGE-L (SFT)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxgpt import conversation
from jaxgpt.config import FinetuneRunConfig
from jaxgpt.data.tokenizers import Tokenizer
from jaxgpt.finetune import metrics as M
from jaxgpt.finetune.batches import Encoded, eval_batches
from jaxgpt.finetune.data import TaskData, prompt_and_reference


def class_probs(eval_step: Callable, params, enc: Encoded, batch_size: int, max_len: int, pad_id: int,
                put: Callable) -> np.ndarray:
    """NxC float32 logits, in example order."""
    out = None
    for rows, batch in eval_batches(enc, batch_size, max_len, pad_id):
        logits_BxC = np.asarray(jax.device_get(eval_step(params, put(batch))))
        if out is None:
            out = np.zeros((len(enc), logits_BxC.shape[1]), np.float32)
        out[rows] = logits_BxC[:len(rows)]
    return out


def evaluate(cfg: FinetuneRunConfig, eval_step: Callable, params, task: TaskData, split: str, enc: Encoded,
             tok: Tokenizer, max_len: int, put: Callable,
             template: conversation.Template = conversation.DEFAULT) -> dict[str, float]:
    B = cfg.train.batch_size
    if task.task == "classify":
        logits_NxC = class_probs(eval_step, params, enc, B, max_len, tok.eos_id, put)
        true_N = enc.label_N
        shifted = logits_NxC - logits_NxC.max(1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        pred_N = logits_NxC.argmax(1)
        return {"loss": float(-log_probs[np.arange(len(true_N)), true_N].mean()),
                "accuracy": M.accuracy(pred_N, true_N), "macro_f1": M.macro_f1(pred_N, true_N, len(task.labels))}
    total = count = 0.0
    for _, batch in eval_batches(enc, B, max_len, tok.eos_id):
        s, n = jax.device_get(eval_step(params, put(batch)))
        total, count = total + float(s), count + float(n)
    result = {"loss": total / max(count, 1.0)}
    result.update(generative_scores(cfg, params["gpt"], task.split(split), tok, template))
    return result


def generative_scores(cfg: FinetuneRunConfig, gpt_params, examples, tok: Tokenizer,
                      template: conversation.Template = conversation.DEFAULT) -> dict[str, float]:
    """Greedy answers to the first `finetune.gen_examples` prompts, scored against the references.

    Prompts are `conversation.prompt_ids`: the very ids training saw before the reply, and chat sends.
    """
    from jaxgpt.generate import SamplingParams, generate_ids

    ft = cfg.finetune
    chosen = examples[:ft.gen_examples]
    if not chosen:
        return {"exact_match": 0.0, "rouge_l": 0.0}
    new_tokens = min(ft.max_new_tokens, cfg.model.block_size // 2)
    keep = cfg.model.block_size - new_tokens
    prompts, refs = [], []
    for ex in chosen:
        context, reference = prompt_and_reference(ex)
        prompts.append(conversation.prompt_ids(template, context, tok)[-keep:])  # the end of a long prompt matters most
        refs.append(reference)
    outs = generate_ids(gpt_params, cfg.model, prompts, new_tokens, eos_id=tok.eos_id, n_vocab=tok.vocab_size,
                        sampling=SamplingParams(temperature=0.0))
    preds = [conversation.reply_text(template, ids, tok) for ids in outs]
    return {"exact_match": float(np.mean([M.exact_match(p, r) for p, r in zip(preds, refs)])),
            "rouge_l": float(np.mean([M.rouge_l(p, r) for p, r in zip(preds, refs)]))}
