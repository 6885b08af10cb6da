import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jaxgpt
from jaxgpt import config
from jaxgpt.errors import JaxgptError
from jaxgpt.train import Trainer, train


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {m["step"]: m["train_loss"] for m in metrics(run_dir)}


def test_loss_falls_and_metrics_are_logged(tmp_path, tiny_overrides):
    summary = train(config.load(None, tiny_overrides), tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"step", "train_loss", "lr", "tokens_per_sec"} <= set(rows[0])
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert summary["val_loss"] < rows[9]["val_loss"]
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


def test_checkpoint_round_trip_for_inference(tmp_path, tiny_overrides):
    trainer = Trainer(config.load(None, tiny_overrides), tmp_path / "run")
    trainer.run()
    model = jaxgpt.load(tmp_path / "run", "latest")
    assert model.step == 30
    # The restored params reproduce the logged final validation loss exactly.
    with jax.set_mesh(trainer.mesh):
        val = trainer.evaluate(model.params)
    assert val == pytest.approx(metrics(tmp_path / "run")[-1]["val_loss"], abs=1e-6)


def test_resume_after_sigterm_equals_uninterrupted(tmp_path, tiny_overrides):
    overrides = {**tiny_overrides, "train.steps": 300, "train.save_every": 1000, "train.eval_every": 100,
                 "model.dropout": 0.1}
    train(config.load(None, overrides), tmp_path / "straight")
    reference = losses(tmp_path / "straight")

    run = tmp_path / "stopped"
    args = [sys.executable, "-m", "jaxgpt.cli", "train", "--run-dir", str(run)]
    args += [f"{k}={v}" for k, v in overrides.items()]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    proc = subprocess.Popen(args[:4] + ["--config", str(cfg_file)] + args[4:])
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for training to be under way, then preempt it
        if (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143  # saved, then the conventional status: `train && generate` stops
    stopped_at = metrics(run)[-1]["step"]
    assert 20 <= stopped_at < 300, "the run finished before it could be interrupted"
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [stopped_at]

    subprocess.run(args[:4] + args[4:], check=True, timeout=300)  # resume: config comes from the run dir
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 301))
    np.testing.assert_allclose([resumed[s] for s in range(1, 301)], [reference[s] for s in range(1, 301)],
                               rtol=0, atol=1e-6)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    train(config.load(None, tiny_overrides), run)
    reference = losses(run)
    damaged = run / "checkpoints" / "30" / "params"
    for f in damaged.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # a write cut short
    with pytest.warns(UserWarning, match="checkpoint step 30 is damaged"):
        train(config.load(None, tiny_overrides), run)
    assert (run / "corrupt_checkpoints" / "30").is_dir()
    again = losses(run)
    assert again[30] == pytest.approx(reference[30], abs=1e-6)
    assert jaxgpt.load(run, "latest").step == 30


def test_nan_loss_stops_without_a_poisoned_checkpoint(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    bad = {**tiny_overrides, "train.lr": 1e30, "train.grad_clip": 0.0, "train.warmup_steps": 0,
           "train.save_every": 1}
    with pytest.raises(JaxgptError, match="training became non-finite"):
        train(config.load(None, bad), run)
    for step_dir in (run / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            model = jaxgpt.load(run, step_dir.name)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model.params))


def test_resume_with_a_different_model_is_refused(tmp_path, tiny_overrides):
    train(config.load(None, {**tiny_overrides, "train.steps": 2}), tmp_path / "run")
    with pytest.raises(JaxgptError, match="was started with model.n_layer=2, not 3"):
        train(config.load(None, {**tiny_overrides, "model.n_layer": 3}), tmp_path / "run")


def test_grad_accumulation_matches_one_big_batch(tmp_path, tiny_overrides):
    base = {**tiny_overrides, "train.steps": 3, "train.eval_every": 100, "train.save_every": 100}
    train(config.load(None, base), tmp_path / "one")
    train(config.load(None, {**base, "train.grad_accum": 4}), tmp_path / "four")
    np.testing.assert_allclose(list(losses(tmp_path / "four").values()), list(losses(tmp_path / "one").values()),
                               rtol=2e-5)
