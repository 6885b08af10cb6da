import subprocess
import sys


def jaxgpt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jaxgpt.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_train_then_generate_end_to_end(tmp_path, tiny_overrides):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  preset: tiny\n")
    overrides = [f"{k}={v}" for k, v in tiny_overrides.items() if k != "model.preset"]
    out = jaxgpt("train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), *overrides)
    assert out.returncode == 0, out.stderr
    assert "done:" in out.stdout
    gen = jaxgpt("generate", "--run-dir", str(tmp_path / "run"), "--prompt", "The ", "--max-new-tokens", "20",
                 "--temperature", "0.8", "--top-k", "5", "--seed", "1")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The ") and len(gen.stdout.rstrip("\n")) > 4
    again = jaxgpt("generate", "--run-dir", str(tmp_path / "run"), "--prompt", "The ", "--max-new-tokens", "20",
                   "--temperature", "0.8", "--top-k", "5", "--seed", "1")
    assert again.stdout == gen.stdout


def test_user_errors_are_one_line(tmp_path):
    cases = [
        (["train", "--config", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path / "r")], "not found"),
        (["train", "--run-dir", str(tmp_path / "r"), "train.steps=3"], "pass --config"),
        (["generate", "--run-dir", str(tmp_path / "nothing")], "not a jaxgpt run dir"),
    ]
    for args, fragment in cases:
        out = jaxgpt(*args)
        assert out.returncode == 2 and fragment in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
