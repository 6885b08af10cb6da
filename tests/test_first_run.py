"""What a new user meets first: every README command parses, defaults fit the model, a failed start
leaves nothing behind, Ctrl-C stops a whole command with the conventional exit status."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import cli, config, precision
from jaxgpt.active.loop import ActiveConfig, ActiveLearner
from jaxgpt.api import LanguageModel
from jaxgpt.data import tokenizers
from jaxgpt.export import default_lengths, export_model
from jaxgpt.exported import load_exported
from jaxgpt.finetune.data import Example, TaskData
from jaxgpt.model import init_params
from jaxgpt.train import train
from jaxgpt.train.signals import StopRequest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Every `jaxgpt ...` command in the README's bash blocks, as argv (optional `[...]` parts dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines are one command
            if line.lstrip().startswith("#"):
                continue
            line = re.sub(r"\s#\s.*$", "", line)  # trailing comments
            line = re.sub(r"\[[^\]]*\]", "", line)  # optional flags shown as [--flag X]
            for part in line.split("&&"):
                argv = shlex.split(part)
                if argv and argv[0].endswith("jaxgpt") and not argv[0].startswith("bash"):
                    commands.append(argv[1:])
    return commands


def test_every_readme_command_parses():
    commands = readme_commands()
    assert len(commands) >= 15 and any(c[0] == "train" for c in commands) and any(c[0] == "generate" for c in commands)
    parser = cli._build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: jaxgpt {' '.join(argv)}")


def test_readme_headline_generation_fits_the_demo_model():
    cfg = config.load(ROOT / "configs/shakespeare.yaml")
    headline = next(c for c in readme_commands() if c[0] == "generate")
    args = cli._build_parser().parse_args(headline)
    assert not args.no_slide  # the window slides, so 200 new tokens on a 128-token model work
    assert cfg.model.dtype == "auto"


@pytest.fixture(scope="module")
def small_lm():
    cfg = config.load(None, {"model.preset": "tiny", "model.vocab_size": 64, "model.block_size": 32})
    tok = tokenizers.CharTokenizer(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.:\n"))
    params = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, init_params(cfg.model, jax.random.key(0)))
    return LanguageModel(cfg, params, tok, 1)


def test_defaults_adapt_to_a_small_context(small_lm, tmp_path):
    kw = dict(max_new_tokens=100, min_new_tokens=100, temperature=0.0)  # end-of-text banned: 100 characters
    text = small_lm.generate("the quick brown fox jumps", **kw)
    assert len(text) == 100  # 25 + 100 characters on a 32-token model: the window slid
    streamed = "".join(small_lm.generate("the quick brown fox jumps", stream=True, **kw))
    assert streamed == text
    reply = small_lm.chat_session().send("hi", temperature=0.0)  # default reply length fits block 32
    assert isinstance(reply, str)
    assert default_lengths(32) == ([16], 16) and default_lengths(1024) == ([16, 64], 128)
    folder = export_model(small_lm, tmp_path / "exp")
    exported = load_exported(folder)
    assert exported.manifest["max_new_tokens"] == 16
    long = exported.generate("the fox", max_new_tokens=40, min_new_tokens=40, temperature=0.0)
    assert len(long) == 40  # slides past its exported lengths
    assert long[:16] == small_lm.generate("the fox", max_new_tokens=16, min_new_tokens=16, temperature=0.0)
    cropped = exported.generate("the quick brown fox jumps over", max_new_tokens=8, temperature=0.0)
    assert cropped == small_lm.generate("the quick brown fox jumps over"[-16:], max_new_tokens=8, temperature=0.0)


def jaxgpt_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jaxgpt.cli", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def test_failed_start_leaves_nothing_that_blocks_the_corrected_command(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    flat = {**tiny_overrides, "train.steps": 3}
    with pytest.raises(Exception, match="model.dtype must be one of"):
        train(config.load(None, {**flat, "model.dtype": "float16x"}), run)
    assert not run.exists()
    with pytest.raises(Exception, match="smaller than the tokenizer"):  # fails after the tokenizer is fitted
        train(config.load(None, {**flat, "model.vocab_size": 8}), run)
    assert not (run / "config.json").exists()
    assert train(config.load(None, flat), run)["step"] == 3
    assert config.load_json(run / "config.json").model.dtype == "auto"


def test_sigint_saves_and_exits_130(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    overrides = [f"{k}={v}" for k, v in {**tiny_overrides, "train.steps": 5000, "train.save_every": 10000}.items()]
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.cli", "train", "--config", str(cfg_file), "--run-dir",
                             str(run), *overrides], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file()
                                          and len((run / "metrics.jsonl").read_text().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "SIGINT: saved step" in out and "run the same command to resume" in out
    assert any(p.name.isdigit() for p in (run / "checkpoints").iterdir())


class InterruptedLearner(ActiveLearner):
    """A stand-in fine-tune that gets Ctrl-C in round `interrupt_at`, inside its own stop request as
    FineTuner's is, and ends that round early as FineTuner does."""

    interrupt_at = 1

    def fit(self, r):
        self.fitted = getattr(self, "fitted", []) + [r]
        with StopRequest() as inner:
            if r == self.interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
                assert inner.requested
        return {"val_loss": 1.0, "val_accuracy": 0.5, "val_macro_f1": 0.5}

    def score(self, r, pool_P):
        return -pool_P.astype(np.float32), None


def test_ctrl_c_stops_active_learning_as_a_whole(tmp_path):
    train_ex = [Example(f"{i}", text=f"text {i}", label="ab"[i % 2]) for i in range(60)]
    task = TaskData("classify", train_ex, train_ex[:4], train_ex[:4], ["a", "b"])
    cfg = config.build({"train.batch_size": 8, "seed": 1}, config.FinetuneRunConfig)
    settings = ActiveConfig(strategy="entropy", rounds=4, query_size=5, seed_size=8)
    first = InterruptedLearner(cfg, settings, tmp_path, task)
    curve = first.run()
    assert first.fitted == [0, 1] and [r["round"] for r in curve] == [0]  # round 1 cut short: not recorded
    assert [json.loads(x)["round"] for x in (tmp_path / "active_curve.jsonl").read_text().splitlines()] == [0]
    again = InterruptedLearner(cfg, settings, tmp_path, task)
    again.interrupt_at = -1
    assert [r["round"] for r in again.run()] == [0, 1, 2, 3] and again.fitted == [1, 2, 3]


def test_auto_dtype_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXGPT_AUTO_DTYPE", raising=False)
    monkeypatch.setenv("JAXGPT_CACHE_DIR", str(tmp_path))
    calls = []
    for speedup, want in ((1.0, "float32"), (2.0, "bfloat16")):
        precision.auto_dtype.cache_clear()
        precision.cpu_bf16_speedup.cache_clear()
        (tmp_path / "precision.json").unlink(missing_ok=True)
        monkeypatch.setattr(precision, "_measure_speedup", lambda s=speedup: calls.append(s) or s)
        assert precision.auto_dtype() == want
        precision.cpu_bf16_speedup.cache_clear()
        assert precision.cpu_bf16_speedup() == speedup  # from the cache file: not measured again
    assert calls == [1.0, 2.0]
    assert "bfloat16" in precision.describe_auto()
    precision.auto_dtype.cache_clear()
    precision.cpu_bf16_speedup.cache_clear()
    monkeypatch.setenv("JAXGPT_AUTO_DTYPE", "float32")
    assert precision.auto_dtype() == "float32"
    precision.auto_dtype.cache_clear()


def test_wrong_run_dir_kinds_are_one_line_errors(tmp_path, train_tiny):
    run = train_tiny(tmp_path / "pre", {"train.steps": 2})
    out = jaxgpt_cli("evaluate", "--run-dir", str(run))
    assert out.returncode == 2 and "pretrained run dir" in out.stderr and len(out.stderr.splitlines()) == 1
    out = jaxgpt_cli("generate", "--run-dir", str(tmp_path / "missing"))
    assert out.returncode == 2 and "jaxgpt train --config" in out.stderr
