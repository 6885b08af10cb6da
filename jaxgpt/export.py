"""Export a trained model as a self-contained inference artifact (`jax.export`, safetensors, JSON).

The folder holds, per prompt bucket, the serialized StableHLO of prefill + the whole decode loop, and per
scoring length (`jaxgpt.score_rows.score_lengths`) a forward pass giving float32 log-probabilities and the
top `MAX_TOP` alternatives per position (batch size symbolic where it exports, else one file per batch
size); the weights as safetensors, the tokenizer, the chat template (chat_template.json) and a manifest.
`jaxgpt.exported.load_exported(folder)` runs it with JAX alone: no Flax, no model code.

    jaxgpt export --run-dir runs/shakespeare --out exported/shakespeare [--quantize int8]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import conversation, files
from jaxgpt.errors import JaxgptError
from jaxgpt.exported import FORMAT_VERSION
from jaxgpt.generate import SamplingParams, decode_loop, prefill
from jaxgpt.sampling import MAX_TOP
from jaxgpt.score_rows import score_lengths
from jaxgpt.scoring import logprob_arrays

MAX_STOP_SEQUENCES, MAX_STOP_TOKENS = 4, 8  # the exported stop-sequence array is fixed at 4 x 8


def flatten(params) -> dict[str, np.ndarray]:
    """Pytree of arrays -> {"h_0/attn/c_attn/kernel": array}, the safetensors layout."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _int8_storage(params):
    """QArrays -> {"int8": values, "scale": scales} dicts, so safetensors can hold them."""
    from jaxgpt.quantize import QArray

    return jax.tree.map(lambda x: {"int8": x.q, "scale": x.scale} if isinstance(x, QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, QArray))


def _int8_arrays(tree):
    """The inverse, inside the exported program: the model then dequantizes each weight where it is used."""
    from jaxgpt.quantize import QArray

    if isinstance(tree, dict) and set(tree) == {"int8", "scale"}:
        return QArray(tree["int8"], tree["scale"])
    return {k: _int8_arrays(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _decode_fn(cfg, max_new_tokens: int, prepare: Callable | None):
    """The exported computation: (weights, prompt, padding, key data, sampling, eos, vocab, stops, limit) ->
    (new tokens BxN, done B). `prepare` maps the stored weights to model params (e.g. int8 dequantize)."""

    def decode(weights, prompt_BxP, start_B, key_data_Bx2, temperature, top_k, top_p, repetition_penalty,
               min_new_tokens, eos_id, n_vocab, stop_SxM, limit):
        params = unflatten(weights)
        params = prepare(params) if prepare else params
        keys_B = jax.random.wrap_key_data(key_data_Bx2)
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, min_new_tokens)
        P = prompt_BxP.shape[1]
        state = prefill(cfg, params, prompt_BxP, start_B, keys_B, n_vocab, stop_SxM, P + max_new_tokens)
        state = decode_loop(cfg, params, state, start_B, limit, sampling, eos_id, n_vocab, stop_SxM, 0)
        return state.seq_BxL[:, P:], state.done_B

    return decode


def _score_fn(cfg, top_k: int, prepare: Callable | None):
    """The exported scoring pass: (weights, tokens BxT, vocab) -> jaxgpt.scoring.logprob_arrays."""

    def score(weights, tokens_BxT, n_vocab):
        params = unflatten(weights)
        return logprob_arrays(cfg, prepare(params) if prepare else params, tokens_BxT, n_vocab, top_k)

    return score


def _weight_specs(weights: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}


def _score_specs(weights: dict[str, np.ndarray], batch, length: int):
    return (_weight_specs(weights), jax.ShapeDtypeStruct((batch, length), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))


def _arg_specs(weights: dict[str, np.ndarray], batch, bucket: int):
    i32, f32 = jnp.int32, jnp.float32
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
    return (
        _weight_specs(weights),
        jax.ShapeDtypeStruct((batch, bucket), i32), jax.ShapeDtypeStruct((batch,), i32),
        jax.ShapeDtypeStruct((batch, 2), jnp.uint32),
        scalar(f32), scalar(i32), scalar(f32), scalar(f32), scalar(i32), scalar(i32), scalar(i32),
        jax.ShapeDtypeStruct((MAX_STOP_SEQUENCES, MAX_STOP_TOKENS), i32), scalar(i32),
    )


def default_lengths(block_size: int) -> tuple[list[int], int]:
    """(prompt buckets, max_new_tokens) that fit the context: 128 new tokens or half the context, and the
    buckets 16 and 64 where they fit (else the room that is left)."""
    n = min(128, block_size // 2)
    return [b for b in (16, 64) if b + n <= block_size] or [block_size - n], n


def export_model(model, out: str | Path, *, batch_sizes: Sequence[int] = (1, 8),
                 prompt_buckets: Sequence[int] | None = None, max_new_tokens: int | None = None,
                 quantize: str | None = None, force: bool = False) -> Path:
    """Write `model` (a `jaxgpt.LanguageModel`) to `out`; returns the folder. Lengths default to
    `default_lengths(block_size)`.

    `out` may be new, empty or an earlier export; `force` replaces any other folder that holds no run dir.
    """
    from safetensors.numpy import save_file

    cfg, out = model.cfg.model, Path(out)
    default_buckets, default_new = default_lengths(cfg.block_size)
    max_new_tokens = default_new if max_new_tokens is None else max_new_tokens
    buckets = sorted(set(int(b) for b in (prompt_buckets or default_buckets)))
    if not buckets or buckets[0] <= 0 or max_new_tokens <= 0:
        raise JaxgptError("export needs positive prompt buckets (--prompt-buckets) and max_new_tokens "
                          "(--max-new-tokens)")
    if buckets[-1] + max_new_tokens > cfg.block_size:
        raise JaxgptError(f"largest prompt bucket ({buckets[-1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                          f"context of {cfg.block_size}; lower --prompt-buckets or --max-new-tokens")
    params, prepare = model.params, None
    if quantize:
        from jaxgpt import quantize as quant

        params, prepare = _int8_storage(quant.quantize_params(params, quantize)), _int8_arrays
    weights = flatten(params)
    n_vocab = model.tokenizer.vocab_size
    top_k = min(MAX_TOP, n_vocab)
    with files.output_folder(out, "export", force) as tmp:
        decode = jax.jit(_decode_fn(cfg, max_new_tokens, prepare))
        programs = [dict(p, prompt_bucket=bucket) for bucket in buckets for p in _export_batches(
            tmp, f"decode_p{bucket}", decode, lambda b, bucket=bucket: _arg_specs(weights, b, bucket), batch_sizes)]
        score = jax.jit(_score_fn(cfg, top_k, prepare))
        score_programs = [dict(p, length=length) for length in score_lengths(cfg.block_size) for p in _export_batches(
            tmp, f"score_t{length}", score, lambda b, length=length: _score_specs(weights, b, length), batch_sizes)]
        save_file(weights, str(tmp / "weights.safetensors"))
        model.tokenizer.save(tmp / "tokenizer")
        conversation.save(model.template, tmp)  # chat_template.json, as the run dir records it
        manifest = {"format": FORMAT_VERSION, "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
                    "n_vocab": n_vocab, "eos_id": model.tokenizer.eos_id,
                    "max_new_tokens": max_new_tokens, "quantize": quantize or "none", "programs": programs,
                    "score_programs": score_programs, "score_top": top_k,
                    "stop_shape": [MAX_STOP_SEQUENCES, MAX_STOP_TOKENS], "weights": sorted(weights),
                    "source_step": model.step}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _export_batches(out: Path, stem: str, fn, specs: Callable, batch_sizes: Sequence[int]) -> list[dict]:
    """Write `fn` exported for a symbolic batch size, else for each of `batch_sizes`; their manifest entries."""
    try:  # one program for every batch size
        (b,) = jax.export.symbolic_shape("b")
        exported = {None: jax.export.export(fn)(*specs(b))}
    except Exception:  # noqa: BLE001  (not every op takes a symbolic batch; fall back to fixed sizes)
        exported = {batch: jax.export.export(fn)(*specs(batch)) for batch in batch_sizes}
    entries = []
    for batch, program in exported.items():
        name = stem + ("" if batch is None else f"_b{batch}") + ".jaxexport"
        (out / name).write_bytes(program.serialize())
        entries.append({"file": name, "batch": batch})
    return entries
