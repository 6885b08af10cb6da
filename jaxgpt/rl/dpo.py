"""DPO: preference tuning from (prompt, chosen, rejected) pairs against a frozen reference.

loss = -log sigmoid(beta [(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))]), where log pi(y) sums
the log-probs of the response tokens given the prompt (the response is followed by end-of-text, which is
scored too). Rows are right-padded: a pair is two rows, chosen and rejected, of prompt + response + eos.
A prompt may be a dialogue (a list of {role, content} messages ending with the user's): it is then rendered
in the run's chat template (jaxgpt.conversation) and the responses are assistant replies, as SFT trains them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt import conversation
from jaxgpt.config import ModelConfig
from jaxgpt.data.records import read_jsonl
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import prompt_bucket
from jaxgpt.rl.policy import next_token_logprobs

FIELDS = ("prompt", "chosen", "rejected")


class Pair(NamedTuple):
    prompt: str | list[dict[str, str]]  # text, or a dialogue answered by chosen/rejected
    chosen: str
    rejected: str
    where: str  # 'FILE line N', for errors found later (e.g. text the tokenizer cannot encode)

Row = tuple[list[int], int]  # (token ids, index of the first response token)


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a JSONL file; a bad line is a one-line error naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise JaxgptError(f"preference data '{path}' not found; pass a JSONL file of {{prompt, chosen, rejected}}")
    pairs = []
    for n, record in read_jsonl(path):
        for field in FIELDS:
            if field not in record:
                raise JaxgptError(f"{path} line {n}: missing field '{field}'")
            if field == "prompt" and isinstance(record[field], list):
                conversation.check_prompt(record[field], f"{path} line {n}")
            elif not isinstance(record[field], str):
                raise JaxgptError(f"{path} line {n}: field '{field}' must be a string, "
                                  f"got {type(record[field]).__name__}")
        if not record["chosen"] or not record["rejected"]:
            raise JaxgptError(f"{path} line {n}: 'chosen' and 'rejected' must not be empty")
        pairs.append(Pair(record["prompt"], record["chosen"], record["rejected"], f"{path} line {n}"))
    if not pairs:
        raise JaxgptError(f"{path} holds no preference pairs")
    return pairs


def encode_row(tokenizer, prompt, response: str, block_size: int,
               template: conversation.Template = conversation.DEFAULT) -> Row:
    """prompt + response + eos ids and where the response starts, cut to block_size.

    Too long: the prompt loses tokens from its start; a response longer than the window keeps its start.
    """
    if isinstance(prompt, list):  # a dialogue: the ids SFT trains on and chat sends
        response_ids = conversation.reply_ids(template, response, tokenizer)[:-1][:block_size - 1] + [tokenizer.eos_id]
        prompt_ids = conversation.prompt_ids(template, prompt, tokenizer)
    else:
        response_ids = tokenizer.encode(response)[:block_size - 1] + [tokenizer.eos_id]
        prompt_ids = tokenizer.encode(prompt) if prompt else []
    keep = block_size - len(response_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - keep:] if keep > 0 else []
    if not prompt_ids:  # the first response token needs something to be predicted from
        prompt_ids = [tokenizer.eos_id]
        response_ids = response_ids[:block_size - 1]
    return prompt_ids + response_ids, len(prompt_ids)


def encode_pairs(tokenizer, pairs: list[Pair], block_size: int,
                 template: conversation.Template = conversation.DEFAULT) -> list[tuple[Row, Row]]:
    """(chosen row, rejected row) per pair; text the tokenizer rejects is an error naming its line."""
    out = []
    for p in pairs:
        try:
            out.append((encode_row(tokenizer, p.prompt, p.chosen, block_size, template),
                        encode_row(tokenizer, p.prompt, p.rejected, block_size, template)))
        except JaxgptError as e:
            raise JaxgptError(f"{p.where}: {e}") from None
    return out


def pair_batch(encoded: list[tuple[Row, Row]], eos_id: int, block_size: int,
               keep: slice = slice(None)) -> dict[str, np.ndarray]:
    """tokens_BxL (B = 2 x pairs: chosen rows, then rejected rows, right-padded with eos) and the response
    mask_BxL over token slots (1 where token t is a response token or the closing eos). Only the rows `keep`
    (this host's) are built, at the width the whole batch needs."""
    rows = [c for c, _ in encoded] + [r for _, r in encoded]
    L = min(prompt_bucket(max(len(ids) for ids, _ in rows), 16), block_size)
    rows = rows[keep]
    tokens_BxL = np.full((len(rows), L), eos_id, np.int32)
    mask_BxL = np.zeros((len(rows), L), np.float32)
    for b, (ids, start) in enumerate(rows):
        tokens_BxL[b, :len(ids)] = ids
        mask_BxL[b, start:len(ids)] = 1.0
    return {"tokens_BxL": tokens_BxL, "mask_BxL": mask_BxL}


def sequence_logprobs(cfg: ModelConfig, params, tokens_BxL, mask_BxL, n_vocab: int) -> jax.Array:
    """B: sum over masked slots t of log p(tokens[t] | tokens[<t])."""
    logp_BxTxV = next_token_logprobs(cfg, params, tokens_BxL, jnp.zeros(tokens_BxL.shape[0], jnp.int32), n_vocab)
    logp_BxT = jnp.take_along_axis(logp_BxTxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(logp_BxT * mask_BxL[:, 1:], axis=-1)


def dpo_loss_from_logprobs(policy_B, ref_B, beta: float):
    """(loss, metrics) from sequence log-probs of 2K rows (K chosen, then K rejected)."""
    K = policy_B.shape[0] // 2
    chosen_K = beta * (policy_B[:K] - ref_B[:K])  # implicit rewards
    rejected_K = beta * (policy_B[K:] - ref_B[K:])
    margin_K = chosen_K - rejected_K
    loss = -jnp.mean(jax.nn.log_sigmoid(margin_K))
    return loss, {"loss": loss, "reward_margin": margin_K.mean(), "reward_accuracy": (margin_K > 0).mean(),
                  "chosen_reward": chosen_K.mean(), "rejected_reward": rejected_K.mean()}


def dpo_loss(cfg: ModelConfig, beta: float, n_vocab: int, params, ref_params, batch):
    ref_B = jax.lax.stop_gradient(sequence_logprobs(cfg, ref_params, batch["tokens_BxL"], batch["mask_BxL"], n_vocab))
    policy_B = sequence_logprobs(cfg, params, batch["tokens_BxL"], batch["mask_BxL"], n_vocab)
    return dpo_loss_from_logprobs(policy_B, ref_B, beta)


def make_dpo_step(cfg: ModelConfig, beta: float, tx: optax.GradientTransformation, n_vocab: int) -> Callable:
    """dpo_step(state, ref_params, batch) -> (state, metrics)."""

    def dpo_step(state, ref_params, batch):
        grads, metrics = jax.grad(lambda p: dpo_loss(cfg, beta, n_vocab, p, ref_params, batch), has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}, metrics

    return dpo_step


def make_dpo_eval(cfg: ModelConfig, beta: float, n_vocab: int) -> Callable:
    return lambda params, ref_params, batch: dpo_loss(cfg, beta, n_vocab, params, ref_params, batch)[1]
