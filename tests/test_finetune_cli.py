"""End to end: pretrain a tiny model, fine-tune it from the CLI, evaluate, load it as a classifier; an SFT
fine-tune with LoRA through the Python API."""

import json
import subprocess
import sys

import pytest

import jaxgpt

WORDS = {"pos": ["good", "fine", "great", "nice"], "neg": ["bad", "poor", "awful", "sad"]}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, train_tiny):
    return train_tiny(tmp_path_factory.mktemp("pre") / "run", {
        "train.steps": 2, "train.batch_size": 4, "train.eval_every": 2, "train.save_every": 2})


def task_file(path, n, seed):
    lines = []
    for i in range(n):
        label = "pos" if (i * 7 + seed) % 3 else "neg"
        words = WORDS[label]
        lines.append(json.dumps({"text": f"it was {words[i % 4]} and {words[(i + seed) % 4]}", "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def jaxgpt_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxgpt.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_finetune_then_evaluate_then_classify(tmp_path, pretrained):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("train:\n  steps: 12\n  batch_size: 8\n  lr: 3.0e-3\n  warmup_steps: 2\n  eval_every: 4\n"
                   "  progress: false\nfinetune:\n  task: classify\n  max_len: 32\n  patience: 5\n")
    run = tmp_path / "genre"
    out = jaxgpt_cli("finetune", "--config", str(cfg), "--init-from", str(pretrained), "--run-dir", str(run),
                     f"finetune.source={task_file(tmp_path / 'train.jsonl', 64, 1)}",
                     f"finetune.test_source={task_file(tmp_path / 'test.jsonl', 16, 2)}", "model.lora_rank=2",
                     "finetune.pooling=mean")
    assert out.returncode == 0, out.stderr
    assert "trainable" in out.stdout and "done:" in out.stdout
    saved = json.loads((run / "config.json").read_text())  # a fine-tune's sections, no RL ones
    assert set(saved) == {"model", "data", "train", "mesh", "seed", "finetune"}
    assert saved["finetune"]["task"] == "classify"
    test_metrics = json.loads((run / "test_metrics.json").read_text())
    assert set(test_metrics) >= {"loss", "accuracy", "macro_f1"} and test_metrics["n"] == 16
    (run / "test_metrics.json").unlink()
    ev = jaxgpt_cli("evaluate", "--run-dir", str(run), "--split", "test")
    assert ev.returncode == 0, ev.stderr
    assert json.loads((run / "test_metrics.json").read_text()) == test_metrics
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_macro_f1" in r] == [4, 8, 12]

    model = jaxgpt.load_classifier(run)
    labels, probs = model.classify(["it was good and nice", "it was bad and sad", "it was"])
    assert len(labels) == 3 and set(labels) <= {"neg", "pos"} and probs.shape == (3, 2)
    assert abs(probs.sum(1) - 1).max() < 1e-5
    bad = jaxgpt_cli("finetune", "--init-from", str(pretrained), "--run-dir", str(tmp_path / "x"),
                     f"finetune.source={tmp_path / 'missing.jsonl'}", "finetune.task=classify")
    assert bad.returncode == 2 and "not found" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_sft_with_lora_generates_after_loading(tmp_path, pretrained):
    from jaxgpt.finetune import finetune, load_config

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n" for w in ["yes", "no"] * 20))
    cfg = load_config(None, [f"finetune.source={data}", "finetune.task=sft", "train.steps=3", "train.batch_size=4",
                             "train.eval_every=3", "train.progress=false", "finetune.gen_examples=2",
                             "finetune.max_new_tokens=4", "model.lora_rank=2"], str(pretrained))
    summary = finetune(cfg, tmp_path / "sft")
    assert {"val_loss", "val_exact_match", "val_rouge_l"} <= set(summary)
    model = jaxgpt.load(tmp_path / "sft")
    assert model.cfg.model.lora_rank == 0  # adapters merged for serving
    assert isinstance(model.generate("say yes", max_new_tokens=3), str)


def test_sigterm_saves_the_step_and_the_same_command_finishes(tmp_path, pretrained):
    import signal
    import time

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("train:\n  steps: 400\n  batch_size: 8\n  lr: 3.0e-3\n  warmup_steps: 2\n  eval_every: 1000\n"
                   "  log_every: 1\n  progress: false\nfinetune:\n  task: classify\n  max_len: 32\n")
    run = tmp_path / "stopped"
    args = [sys.executable, "-m", "jaxgpt.cli", "finetune", "--config", str(cfg), "--init-from", str(pretrained),
            "--run-dir", str(run), f"finetune.source={task_file(tmp_path / 'train.jsonl', 64, 1)}",
            f"finetune.test_source={task_file(tmp_path / 'test.jsonl', 16, 2)}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file()
                                          and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    stopped = int(out.split("SIGTERM: saved step ")[1].split(";")[0])
    # The interrupted step was evaluated and saved; the test split waits for the finished run.
    assert (run / "checkpoints" / str(stopped)).is_dir() and not (run / "test_metrics.json").exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from step {stopped}" in again.stdout and (run / "test_metrics.json").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401))
