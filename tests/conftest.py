"""Shared fixtures: a small real-text corpus made from CPython's own reference prose (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAXGPT_AUTO_DTYPE", "float32")  # model.dtype=auto: reference numbers are float32's
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import pydoc_data.topics
import pytest

# Reference comparisons (float64, transformers) need true float32 matmuls: NVIDIA GPUs default to TF32.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Twelve plain-text documents of English prose (~15 KB each)."""
    folder = tmp_path_factory.mktemp("corpus")
    topics = pydoc_data.topics.topics
    texts = [topics[k] for k in sorted(topics)]
    for i in range(12):
        chunk = "\n\n".join(texts[i::12])[:15000]
        (folder / f"doc{i:02d}.txt").write_text(chunk, encoding="utf-8")
    return folder


@pytest.fixture
def tiny_overrides(corpus_dir, tmp_path):
    """Overrides for a seconds-long training run on the test corpus."""
    return {
        "model.preset": "tiny", "model.block_size": 32, "data.source": f"file:{corpus_dir}/*.txt",
        "data.tokenizer": "char", "data.cache_dir": str(tmp_path / "cache"), "train.steps": 30,
        "train.batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 5, "train.eval_every": 10,
        "train.eval_batches": 2, "train.save_every": 10, "train.log_every": 1, "train.progress": False,
    }


@pytest.fixture(scope="session")
def train_tiny(corpus_dir):
    """train_tiny(run_dir, {key: value}): a few steps of a tiny char-level model on the test corpus."""

    def run(run_dir, overrides):
        from jaxgpt import config
        from jaxgpt.train import train

        base = {"model.preset": "tiny", "model.block_size": 32, "data.source": f"file:{corpus_dir}/*.txt",
                "data.tokenizer": "char", "data.cache_dir": str(run_dir.parent / "cache"), "train.eval_batches": 1,
                "train.progress": False}
        train(config.load(None, {**base, **overrides}), run_dir)
        return run_dir

    return run
