"""Hugging Face GPT-2 <-> jaxgpt: config and weight tables, run-dir import/export, `from_pretrained`.

Reads and writes `config.json` + `model.safetensors` only; PyTorch pickles (`pytorch_model.bin`) are
refused, never unpickled. HF's Conv1D stores weights as (in, out), the same orientation as jaxgpt's
kernels, so the conversion is renames plus reshapes that split heads out of the model width.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import files
from jaxgpt.config import Config, DataConfig, ModelConfig
from jaxgpt.data import tokenizers
from jaxgpt.errors import JaxgptError
from jaxgpt.model import stack_layers, unstack_layers, validate

# jaxgpt model keys taken from the HF checkpoint; `convert hf-to-jaxgpt` overrides may not change them.
_ARCH_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")
# GPT2Config defaults for keys an older config.json may leave out.
_HF_DEFAULTS = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "add_cross_attention": False, "tie_word_embeddings": True, "n_inner": None}


class HFCheckpoint(NamedTuple):
    """An imported model: `params` has `model.vocab_size` rows (zero-padded to a multiple of 64);
    `n_vocab` is the real vocabulary the checkpoint was trained with."""

    model: ModelConfig
    params: dict[str, Any]
    n_vocab: int


def padded_vocab(n_vocab: int) -> int:
    return -(-n_vocab // 64) * 64


# --- HF -> jaxgpt --------------------------------------------------------------------------------

def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise JaxgptError(f"'{hf_dir}' has no config.json; pass a folder written by save_pretrained")
    return {**_HF_DEFAULTS, **json.loads(path.read_text())}


def model_config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, int]:
    """(jaxgpt ModelConfig, real vocab size) for an HF GPT-2 config, or a JaxgptError naming what differs."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise JaxgptError(f"model_type '{hf['model_type']}' is not supported; only GPT-2 (model_type gpt2) converts")
    D = hf["n_embd"]
    unsupported = {
        "activation_function": hf["activation_function"] not in ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": hf["n_inner"] not in (None, 4 * D),
        "layer_norm_epsilon": not math.isclose(hf["layer_norm_epsilon"], 1e-5),
        "scale_attn_weights": not hf["scale_attn_weights"],
        "scale_attn_by_inverse_layer_idx": bool(hf["scale_attn_by_inverse_layer_idx"]),
        "reorder_and_upcast_attn": bool(hf["reorder_and_upcast_attn"]),
        "add_cross_attention": bool(hf["add_cross_attention"]),
        "tie_word_embeddings": not hf["tie_word_embeddings"],
    }
    bad = [f"{k}={hf[k]!r}" for k, is_bad in unsupported.items() if is_bad]
    if bad:
        raise JaxgptError(f"this GPT-2 config uses features jaxgpt's model does not have: {', '.join(bad)} "
                          "(jaxgpt supports tanh GELU, MLP width 4*n_embd, LayerNorm eps 1e-5, tied embeddings)")
    n_vocab = hf["vocab_size"]
    model = ModelConfig(vocab_size=padded_vocab(n_vocab), block_size=hf["n_positions"], n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=D, dropout=0.0, bias=True)
    validate(model)
    return model, n_vocab


def _load_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any((hf_dir / name).exists() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise JaxgptError(
            f"'{hf_dir}' has only pytorch_model.bin; jaxgpt refuses to unpickle PyTorch files (loading a pickle can "
            "run arbitrary code). Convert it once, in an environment you trust, with: python -c \"from transformers "
            f"import GPT2LMHeadModel as M; M.from_pretrained('{hf_dir}').save_pretrained('{hf_dir}', "
            "safe_serialization=True)\"")
    else:
        raise JaxgptError(f"'{hf_dir}' has no model.safetensors; pass a folder written by save_pretrained")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(_load_safetensors(hf_dir / name))
    return tensors


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    import safetensors.numpy

    try:
        try:
            return safetensors.numpy.load_file(path)
        except TypeError:  # bfloat16 has no NumPy dtype; JAX's loader reads it
            import safetensors.flax

            return {k: np.asarray(v, np.float32) for k, v in safetensors.flax.load_file(path).items()}
    except (safetensors.SafetensorError, ValueError, OSError) as e:  # only parsed, never executed
        raise JaxgptError(f"'{path}' is not a valid safetensors file ({str(e).splitlines()[0][:120]}); "
                          "re-save it with save_pretrained(..., safe_serialization=True)") from None


def hf_to_params(hf_dir: str | Path) -> HFCheckpoint:
    """Read an HF GPT-2 folder (config.json + model.safetensors) into jaxgpt's float32 parameter pytree."""
    hf_dir = Path(hf_dir)
    model, n_vocab = model_config_from_hf(_read_hf_config(hf_dir))
    # Checkpoints saved from GPT2LMHeadModel prefix keys with "transformer."; from GPT2Model they do not.
    tensors = {k.removeprefix("transformer."): v for k, v in _load_tensors(hf_dir).items()}
    D, H, L = model.n_embd, model.n_head, model.n_layer
    K = D // H

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise JaxgptError(f"'{hf_dir}' lacks tensor '{key}'; is it a GPT-2 checkpoint?")
        value = tensors.pop(key)
        if value.size != math.prod(shape):
            raise JaxgptError(f"tensor '{key}' has shape {value.shape}, which does not fit {shape} from config.json")
        return np.asarray(value, np.float32).reshape(shape)

    wte_NxD = take("wte.weight", (n_vocab, D))
    wte_VxD = np.zeros((model.vocab_size, D), np.float32)  # padding rows: zero, and never sampled
    wte_VxD[:n_vocab] = wte_NxD
    params: dict[str, Any] = {"wte": wte_VxD, "wpe": take("wpe.weight", (model.block_size, D))}
    for i in range(L):
        p = f"h.{i}."
        params[f"h_{i}"] = {
            "ln_1": {"scale": take(p + "ln_1.weight", (D,)), "bias": take(p + "ln_1.bias", (D,))},
            "attn": {
                # Conv1D (D, 3D) columns are [q | k | v], each split head-major into H x K.
                "c_attn": {"kernel": take(p + "attn.c_attn.weight", (D, 3, H, K)),
                           "bias": take(p + "attn.c_attn.bias", (3, H, K))},
                "c_proj": {"kernel": take(p + "attn.c_proj.weight", (H, K, D)),
                           "bias": take(p + "attn.c_proj.bias", (D,))},
            },
            "ln_2": {"scale": take(p + "ln_2.weight", (D,)), "bias": take(p + "ln_2.bias", (D,))},
            "mlp": {"c_fc": {"kernel": take(p + "mlp.c_fc.weight", (D, 4 * D)),
                             "bias": take(p + "mlp.c_fc.bias", (4 * D,))},
                    "c_proj": {"kernel": take(p + "mlp.c_proj.weight", (4 * D, D)),
                               "bias": take(p + "mlp.c_proj.bias", (D,))}},
        }
        # Older checkpoints also store the causal-mask buffers; jaxgpt builds its mask itself.
        tensors.pop(p + "attn.bias", None)
        tensors.pop(p + "attn.masked_bias", None)
    params["ln_f"] = {"scale": take("ln_f.weight", (D,)), "bias": take("ln_f.bias", (D,))}
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(np.asarray(lm_head, np.float32), wte_NxD):
        raise JaxgptError(f"'{hf_dir}' has an lm_head different from wte; jaxgpt only supports tied embeddings")
    if tensors:
        raise JaxgptError(f"'{hf_dir}' has tensors a GPT-2 does not: {', '.join(sorted(tensors)[:5])}")
    return HFCheckpoint(model, params, n_vocab)


# Where `jaxgpt convert jaxgpt-to-hf` keeps a tokenizer transformers cannot load (char, sentencepiece).
JAXGPT_TOKENIZER_DIR = "jaxgpt_tokenizer"


def load_hf_tokenizer(hf_dir: str | Path) -> tokenizers.Tokenizer:
    """The tokenizer of an HF folder: jaxgpt's own if jaxgpt exported it with one, else GPT-2's from
    vocab.json + merges.txt (or, failing that, tokenizer.json)."""
    hf_dir = Path(hf_dir)
    if (hf_dir / JAXGPT_TOKENIZER_DIR / "tokenizer.json").is_file():
        return tokenizers.load(hf_dir / JAXGPT_TOKENIZER_DIR)
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        return _gpt2_tokenizer(hf_dir / "vocab.json", hf_dir / "merges.txt", hf_dir)
    if (hf_dir / "tokenizer.json").is_file():
        # transformers 5 saves only tokenizer.json; its BPE vocab and merges are the same data.
        spec = json.loads((hf_dir / "tokenizer.json").read_text())
        bpe, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if bpe.get("type") != "BPE" or pre.get("type") != "ByteLevel":
            raise JaxgptError(f"'{hf_dir}/tokenizer.json' is not a GPT-2 byte-level BPE tokenizer")
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        tmp = Path(tempfile.mkdtemp(prefix="jaxgpt-tok-"))
        (tmp / "encoder.json").write_text(json.dumps(bpe["vocab"]))
        (tmp / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return _gpt2_tokenizer(tmp / "encoder.json", tmp / "vocab.bpe", hf_dir)
    raise JaxgptError(f"'{hf_dir}' has no tokenizer (vocab.json + merges.txt, tokenizer.json or "
                      f"{JAXGPT_TOKENIZER_DIR}/); add the tokenizer the model was trained with (GPT-2's files only if "
                      "it was trained with GPT-2's tokenizer)")


def _gpt2_tokenizer(encoder_json: Path, vocab_bpe: Path, hf_dir: Path) -> tokenizers.GPT2Tokenizer:
    try:
        tok = tokenizers.GPT2Tokenizer(encoder_json, vocab_bpe)
    except (AssertionError, ValueError, KeyError) as e:  # tiktoken asserts vocab and merges agree
        raise JaxgptError(f"the tokenizer in '{hf_dir}' is not GPT-2-style byte-level BPE "
                          f"({type(e).__name__})") from None
    vocab = json.loads(encoder_json.read_text())
    if vocab.get(tokenizers.EOS, tok.eos_id) != tok.eos_id:
        raise JaxgptError(f"the tokenizer in '{hf_dir}' puts {tokenizers.EOS} at id {vocab[tokenizers.EOS]}, "
                          f"not after its {tok.eos_id} merged tokens as GPT-2 does")
    return tok


def _check_tokenizer_fits(tok: tokenizers.Tokenizer, n_vocab: int, hf_dir: Path) -> None:
    if tok.vocab_size > n_vocab:
        raise JaxgptError(f"the tokenizer in '{hf_dir}' has {tok.vocab_size} ids but the model only {n_vocab}")


def from_pretrained(hf_dir: str | Path):
    """A `jaxgpt.LanguageModel` straight from a local HF GPT-2 folder (weights, config and tokenizer)."""
    import jax

    from jaxgpt.api import LanguageModel

    hf_dir = Path(hf_dir)
    ckpt = hf_to_params(hf_dir)
    tok = load_hf_tokenizer(hf_dir)
    _check_tokenizer_fits(tok, ckpt.n_vocab, hf_dir)
    cfg = Config(model=ckpt.model, data=DataConfig(tokenizer=tok.kind))
    return LanguageModel(cfg, jax.device_put(ckpt.params), tok, step=None)


def import_hf(hf_dir: str | Path, run_dir: str | Path, overrides: list[str] | dict[str, Any] = ()) -> Config:
    """Make a jaxgpt run dir (config.json, tokenizer/, a step-0 checkpoint) from an HF GPT-2 folder.

    `overrides` set the data/train sections (e.g. data.source=... to fine-tune) and model.dropout/dtype;
    the architecture comes from the checkpoint. `jaxgpt train --run-dir` then fine-tunes from step 0
    with a fresh optimizer: the saved optimizer state is a new AdamW's, since HF has none to carry over.
    """
    import jax

    from jaxgpt.train.checkpoint import Checkpointer
    from jaxgpt.train.optimizer import make_optimizer

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        raise JaxgptError(f"'{run_dir}' already holds a run; import into a new --run-dir")
    ckpt = hf_to_params(hf_dir)
    tok = load_hf_tokenizer(hf_dir)
    _check_tokenizer_fits(tok, ckpt.n_vocab, hf_dir)
    flat = dict(config_lib.parse_overrides(list(overrides)) if isinstance(overrides, list | tuple) else overrides)
    for key in _ARCH_KEYS + ("preset",):
        if f"model.{key}" in flat:
            raise JaxgptError(f"model.{key} comes from the Hugging Face checkpoint and cannot be overridden")
    if flat.get("data.tokenizer", tok.kind) != tok.kind:
        raise JaxgptError(f"this checkpoint's tokenizer is '{tok.kind}'; drop the data.tokenizer override")
    flat.update({f"model.{k}": getattr(ckpt.model, k) for k in _ARCH_KEYS})
    flat["data.tokenizer"] = tok.kind
    cfg = config_lib.build(flat)

    dtype = config_lib.dtype_of(cfg.model.param_dtype)
    params = jax.tree.map(lambda a: jax.numpy.asarray(a, dtype), ckpt.params)
    if cfg.model.scan_layers:  # the checkpoint must have the layout training restores into
        params = stack_layers(params, cfg.model.n_layer)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise JaxgptError(f"'{run_dir}' is not empty; import into a new --run-dir")
    # Built beside the target and renamed into place: a failed import leaves nothing at --run-dir.
    run_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir.absolute().parent, prefix=f".{run_dir.name}.import-"))
    try:
        tok.save(tmp / "tokenizer")
        ckpt_writer = Checkpointer(tmp)
        try:
            # val_loss inf: no evaluation yet, so any fine-tuned checkpoint counts as better.
            opt_state = make_optimizer(cfg.train).init(params)
            ckpt_writer.save(0, {"params": params, "opt_state": opt_state}, {"val_loss": float("inf")})
        finally:
            ckpt_writer.close()
        config_lib.save_json(cfg, tmp / "config.json")
        if run_dir.exists():
            run_dir.rmdir()  # empty, checked above
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


# --- jaxgpt -> HF --------------------------------------------------------------------------------

def hf_config_from_model(model: ModelConfig, n_vocab: int, eos_id: int | None = None) -> dict[str, Any]:
    """A GPT2Config dict for `transformers` (written by hand so export needs no torch)."""
    eos = n_vocab - 1 if eos_id is None else eos_id
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": n_vocab,
        "n_positions": model.block_size, "n_embd": model.n_embd, "n_layer": model.n_layer, "n_head": model.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": model.dropout, "embd_pdrop": model.dropout, "attn_pdrop": model.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
        "use_cache": True, "bos_token_id": eos, "eos_token_id": eos, "dtype": "float32",
    }


def params_to_hf(cfg: Config | ModelConfig, params, n_vocab: int, hf_dir: str | Path,
                 tokenizer: tokenizers.Tokenizer | None = None, force: bool = False) -> list[Path]:
    """Write config.json + model.safetensors (float32, padded vocab rows dropped) that
    `GPT2LMHeadModel.from_pretrained(hf_dir)` loads; with a GPT-2 tokenizer also vocab.json + merges.txt."""
    import safetensors.numpy

    model = cfg.model if isinstance(cfg, Config) else cfg
    if not model.bias:
        raise JaxgptError("Hugging Face GPT-2 always has biases; a model.bias=false model cannot be exported")
    if not 0 < n_vocab <= model.vocab_size:
        raise JaxgptError(f"n_vocab ({n_vocab}) must be in [1, model.vocab_size={model.vocab_size}]")
    D, L = model.n_embd, model.n_layer
    p = unstack_layers(params, L)  # scan_layers params stack the blocks on a leading axis

    def f32(a, shape=None) -> np.ndarray:
        a = np.asarray(a, np.float32)
        return np.ascontiguousarray(a if shape is None else a.reshape(shape))

    tensors = {"transformer.wte.weight": f32(p["wte"])[:n_vocab].copy(),
               "transformer.wpe.weight": f32(p["wpe"])}
    for i in range(L):
        b, pre = p[f"h_{i}"], f"transformer.h.{i}."
        tensors.update({
            pre + "ln_1.weight": f32(b["ln_1"]["scale"]), pre + "ln_1.bias": f32(b["ln_1"]["bias"]),
            pre + "attn.c_attn.weight": f32(b["attn"]["c_attn"]["kernel"], (D, 3 * D)),
            pre + "attn.c_attn.bias": f32(b["attn"]["c_attn"]["bias"], (3 * D,)),
            pre + "attn.c_proj.weight": f32(b["attn"]["c_proj"]["kernel"], (D, D)),
            pre + "attn.c_proj.bias": f32(b["attn"]["c_proj"]["bias"]),
            pre + "ln_2.weight": f32(b["ln_2"]["scale"]), pre + "ln_2.bias": f32(b["ln_2"]["bias"]),
            pre + "mlp.c_fc.weight": f32(b["mlp"]["c_fc"]["kernel"]),
            pre + "mlp.c_fc.bias": f32(b["mlp"]["c_fc"]["bias"]),
            pre + "mlp.c_proj.weight": f32(b["mlp"]["c_proj"]["kernel"]),
            pre + "mlp.c_proj.bias": f32(b["mlp"]["c_proj"]["bias"]),
        })
    tensors["transformer.ln_f.weight"] = f32(p["ln_f"]["scale"])
    tensors["transformer.ln_f.bias"] = f32(p["ln_f"]["bias"])

    hf_dir = Path(hf_dir)
    eos = tokenizer.eos_id if tokenizer is not None else None
    names = ["config.json", "model.safetensors"]
    if tokenizer is None and isinstance(cfg, Config) and cfg.data.tokenizer == "gpt2":
        tokenizer = tokenizers.GPT2Tokenizer.bundled()
    with files.output_folder(hf_dir, "convert jaxgpt-to-hf", force, flag="--hf-dir") as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config_from_model(model, n_vocab, eos), indent=2) + "\n")
        # transformers refuses safetensors files whose metadata does not name the format.
        safetensors.numpy.save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if isinstance(tokenizer, tokenizers.GPT2Tokenizer):
            encoder_json, vocab_bpe = tokenizer.files
            shutil.copyfile(encoder_json, tmp / "vocab.json")
            shutil.copyfile(vocab_bpe, tmp / "merges.txt")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model.block_size,
                 "bos_token": tokenizers.EOS, "eos_token": tokenizers.EOS, "unk_token": tokenizers.EOS,
                 "add_prefix_space": False}, indent=2) + "\n")
            names += ["vocab.json", "merges.txt", "tokenizer_config.json"]
        elif tokenizer is not None:  # transformers cannot load it; kept so the folder converts back whole
            tokenizer.save(tmp / JAXGPT_TOKENIZER_DIR)
            names.append(JAXGPT_TOKENIZER_DIR)
    written = [hf_dir / name for name in names]
    return written


def export_hf(run_dir: str | Path, hf_dir: str | Path, checkpoint: str = "best", force: bool = False) -> list[Path]:
    """Write a trained run dir's checkpoint as an HF GPT-2 folder; returns the files written."""
    from jaxgpt.api import load

    files.check_output_folder(hf_dir, "convert jaxgpt-to-hf", force, flag="--hf-dir")  # fail before loading
    lm = load(run_dir, checkpoint)
    return params_to_hf(lm.cfg, lm.params, lm.tokenizer.vocab_size, hf_dir, tokenizer=lm.tokenizer, force=force)
