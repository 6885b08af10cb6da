"""Every training mode is as durable as pretraining: kill -9 at several points of `jaxgpt finetune`, `jaxgpt rl`
and `jaxgpt dpo`, then the same command again: the run finishes, and every logged metric of the resumed
steps equals an uninterrupted run's, bit for bit (CPU)."""

import json
import math
import os
import re
import signal

import pytest

from jaxgpt.cli import main
from killing import kill_then_resume

TIMING = ("sec", "tokens_per_sec", "mfu")


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def assert_same(resumed, reference):
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for got, want in zip(resumed, reference):
        assert got.keys() == want.keys(), got["step"]
        for key in want:  # bit-exact: the same floats, NaN only where the reference has NaN
            assert got[key] == want[key] or (math.isnan(got[key]) and math.isnan(want[key])), (got["step"], key)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, train_tiny):
    root = tmp_path_factory.mktemp("resume")
    train_tiny(root / "pre", {"train.steps": 2, "train.batch_size": 8, "train.eval_every": 2, "train.save_every": 2})
    return root


def test_finetune_killed_then_resumed_equals_uninterrupted(pretrained, tmp_path):
    data = tmp_path / "train.jsonl"
    words = {"pos": ["good", "fine", "great", "nice"], "neg": ["bad", "poor", "awful", "sad"]}
    data.write_text("".join(json.dumps({"text": f"it was {words[lab][i % 4]} and {words[lab][i % 3]}", "label": lab})
                            + "\n" for i in range(48) for lab in ["pos" if i % 3 else "neg"]))
    # Unfreezing (multi_transform), plateau LR scaling, early-stopping counters and dropout all carry across.
    args = ["finetune", "--init-from", str(pretrained / "pre"), f"finetune.source={data}", "finetune.task=classify",
            "finetune.max_len=16", "finetune.unfreeze_every=3", "finetune.plateau_factor=0.5",
            "finetune.plateau_patience=1", "finetune.patience=100", "model.dropout=0.1", "train.steps=12",
            "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2", "train.eval_every=2", "train.log_every=1",
            "train.progress=false"]
    assert main(args + ["--run-dir", str(tmp_path / "reference")]) == 0
    reference = rows(tmp_path / "reference" / "metrics.jsonl")
    run_dir = tmp_path / "killed"
    out = kill_then_resume(args + ["--run-dir", run_dir], [(4, "save"), (9, "mid-line")])
    resumed = rows(run_dir / "metrics.jsonl")
    # From a checkpoint written before the kill at step 9 (which one depends on how far the asynchronous
    # saves had got when the process died).
    resumed_from = re.search(r"resuming from step (\d+)", out)
    assert resumed_from and 0 < int(resumed_from.group(1)) <= 8, out[-500:]
    assert_same(resumed, reference)
    assert len({r["lr"] for r in reference}) > 3  # the schedule and the plateau scale really moved


def test_rl_killed_then_resumed_equals_uninterrupted(pretrained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["The object", "A function", "The value of", "If the", "When a class", "The result"]))
    args = ["rl", "--init-from", str(pretrained / "pre"), f"rl.prompts={prompts}", "rl.reward=target_word",
            "rl.target_word=the", "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=6",
            "rl.eval_prompts=2", "rl.eval_samples=2", "rl.ppo_epochs=2", "train.steps=6", "train.eval_every=2",
            "train.save_every=2", "train.log_every=1", "train.progress=false", "train.lr=1e-3"]
    assert main(args + ["--run-dir", str(tmp_path / "reference")]) == 0
    reference = rows(tmp_path / "reference" / "rl_metrics.jsonl")
    run_dir = tmp_path / "killed"
    kill_then_resume(args + ["--run-dir", run_dir], [(2, "save"), (5, "mid-line")])
    resumed = rows(run_dir / "rl_metrics.jsonl")
    assert_same(resumed, reference)
    assert rows(run_dir / "rl_samples.jsonl") == rows(tmp_path / "reference" / "rl_samples.jsonl")
    meta = json.loads((run_dir / "checkpoints" / "selection.json").read_text())
    assert meta == {"metric": "eval_reward", "mode": "max"}  # the reward itself, not a negated 'val_loss'


def dpo_args(pretrained, tmp_path, *extra):
    words = ["the value", "a class", "an object", "the method", "a name", "the list"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Use {w}", "chosen": " of the type.", "rejected": " is it"}) + "\n"
                             for w in words * 2))
    return ["dpo", "--init-from", str(pretrained / "pre"), "--data", str(pairs), "train.batch_size=4",
            "train.log_every=1", "train.lr=3e-3", "train.warmup_steps=1", "train.progress=false", *extra]


def test_dpo_killed_then_resumed_equals_uninterrupted(pretrained, tmp_path):
    args = dpo_args(pretrained, tmp_path, "train.steps=6", "train.eval_every=2", "train.save_every=2")
    assert main(args + ["--run-dir", str(tmp_path / "reference")]) == 0
    reference = rows(tmp_path / "reference" / "rl_metrics.jsonl")
    run_dir = tmp_path / "killed"
    kill_then_resume(args + ["--run-dir", run_dir], [(2, "save"), (4, "step")])
    resumed = rows(run_dir / "rl_metrics.jsonl")
    assert_same(resumed, reference)


def test_sigterm_during_an_evaluation_saves(pretrained, tmp_path, monkeypatch, capsys):
    from jaxgpt.rl.loop import DPOLoop

    evaluate = DPOLoop.evaluate

    def interrupted_evaluate(self, state, step):
        if step == 3:  # an evaluation-only step: no save was due
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, state, step)

    monkeypatch.setattr(DPOLoop, "evaluate", interrupted_evaluate)
    run_dir = tmp_path / "dpo"
    args = dpo_args(pretrained, tmp_path, "train.steps=8", "train.eval_every=3", "train.save_every=100",
                    "--run-dir", str(run_dir))
    assert main(args) == 143
    assert "SIGTERM: saved step 4" in capsys.readouterr().out  # the next step saw the request, evaluated and saved
    assert (run_dir / "checkpoints" / "4").is_dir()
    monkeypatch.setattr(DPOLoop, "evaluate", evaluate)
    assert main(args) == 0
    assert [r["step"] for r in rows(run_dir / "rl_metrics.jsonl")] == list(range(9))
