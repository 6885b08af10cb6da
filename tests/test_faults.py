"""Fault injection: each way a run dir used to get lost or poisoned now ends in one line and a resumable run dir.

Numbered as in the issue: 1 outputs over run dirs, 2 corpus cache, 3 NaN, 4 damaged checkpoints,
5 torn writes, locks, full disk and permissions, 6 command-line values. Last: kill -9 anywhere, then resume.
"""

import errno
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxgpt
from jaxgpt import config, files
from jaxgpt.cli import main
from jaxgpt.convert import hf
from jaxgpt.data import corpus, sources, tokenizers
from jaxgpt.errors import JaxgptError
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import train
from killing import kill_then_resume

RUN_STEPS = {"train.steps": 6, "train.save_every": 2, "train.eval_every": 2, "train.log_every": 1,
             "train.batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 2}
EXPORT_SMALL = ["--prompt-buckets", "8", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, train_tiny):
    """A 6-step tiny run with checkpoints at steps 4 and 6 (the latest two; 6 is also the best)."""
    return train_tiny(tmp_path_factory.mktemp("base") / "run", RUN_STEPS)


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of the base run (its config still points at the base run's token cache)."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def resume(run_dir, **overrides):
    """`jaxgpt train --run-dir RUN key=value ...`: the saved config with train.* overrides."""
    saved = config.read_json_flat(run_dir / "config.json")
    return train(config.load(None, {**saved, **overrides}), run_dir)


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(capsys, *args):
    """(exit code, stderr) of the CLI run in-process."""
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def one_line(err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def tree_digest(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---- 1. outputs never replace or write into a run dir ---------------------------------------------

def test_export_refuses_run_dirs_and_foreign_folders(run, tmp_path, capsys, monkeypatch):
    before = tree_digest(run)
    for out, extra in [(run, []), (run, ["--force"]), (run / "exported", ["--force"]), (tmp_path, ["--force"])]:
        rc, err = cli(capsys, "export", "--run-dir", run, "--out", out, *EXPORT_SMALL, *extra)
        assert rc == 2
        one_line(err, "run dir")
    monkeypatch.chdir(run / "tokenizer")
    rc, err = cli(capsys, "export", "--run-dir", run, "--out", ".", "--force", *EXPORT_SMALL)
    assert rc == 2 and one_line(err, "run dir")
    monkeypatch.chdir(tmp_path)
    assert tree_digest(run) == before  # nothing deleted, nothing written

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    rc, err = cli(capsys, "export", "--run-dir", run, "--out", foreign, *EXPORT_SMALL)
    assert rc == 2 and one_line(err, "--force") and (foreign / "todo.txt").is_file()
    assert cli(capsys, "export", "--run-dir", run, "--out", foreign, "--force", *EXPORT_SMALL)[0] == 0
    assert not (foreign / "todo.txt").exists() and (foreign / "manifest.json").is_file()
    # An earlier export is ours to replace; the folder is swapped in one rename, never left half-written.
    assert cli(capsys, "export", "--run-dir", run, "--out", foreign, *EXPORT_SMALL)[0] == 0
    assert not list(tmp_path.glob(".notes.*"))


def test_convert_never_overwrites_a_run_dir_config(run, tmp_path, capsys):
    before = tree_digest(run)
    rc, err = cli(capsys, "convert", "jaxgpt-to-hf", "--run-dir", run, "--hf-dir", run, "--force")
    assert rc == 2 and one_line(err, "run dir")
    assert tree_digest(run) == before
    rc, err = cli(capsys, "convert", "jaxgpt-to-hf", "--run-dir", run, "--hf-dir", tmp_path / "hf")
    assert rc == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"


# ---- 2. the token cache is keyed by content; loops and special files are refused -------------------

def _prepare(source, cache):
    cfg = config.load(None, {"data.source": source, "data.cache_dir": str(cache), "data.tokenizer": "char"})
    return corpus.prepare(cfg.data, tokenizers.CharTokenizer(list("abcdefgh \n")))


def test_cache_follows_the_bytes_not_the_path(tmp_path, monkeypatch):
    text = tmp_path / "a" / "data.txt"
    text.parent.mkdir()
    text.write_text("abc abc abc\n" * 50)
    first = _prepare(f"file:{text}", tmp_path / "cache")
    text.write_text("hgf hgf hgf\n" * 50)  # edited in place, same size
    edited = _prepare(f"file:{text}", tmp_path / "cache")
    assert edited.folder != first.folder and not np.array_equal(np.asarray(edited.train), np.asarray(first.train))

    other = tmp_path / "b" / "data.txt"  # the same relative `file:data.txt` in another project
    other.parent.mkdir()
    other.write_text("ddd eee\n" * 50)
    monkeypatch.chdir(text.parent)
    in_a = _prepare("file:data.txt", tmp_path / "cache")
    monkeypatch.chdir(other.parent)
    in_b = _prepare("file:data.txt", tmp_path / "cache")
    assert in_a.folder != in_b.folder
    assert set(np.asarray(in_b.train).tolist()) <= set(tokenizers.CharTokenizer(list("abcdefgh \n")).encode("de \n"))


def test_symlink_loops_and_special_files_are_refused(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.txt").write_text("hello\n")
    (data / "sub" / "loop").symlink_to(data)
    for source in (str(data), f"{data}/**/*.txt"):
        with pytest.raises(JaxgptError, match="symlink loop"):
            sources.local_files(source)
    with pytest.raises(JaxgptError, match="special filesystem"):
        sources.local_files("/proc/self")
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(JaxgptError, match="not a regular file"):
        sources.local_files(f"{tmp_path}/*.txt")
    # Two links to one file: read once, so its text cannot land in both splits.
    (data / "sub" / "loop").unlink()
    (data / "twin.txt").symlink_to(data / "sub" / "a.txt")
    assert len(sources.local_files(str(data))) == 1


# ---- 3. NaN/Inf stops the run before anything is saved ---------------------------------------------

def test_nan_step_is_never_saved_or_ranked_best(run, base_run):
    best_before = ckpt_lib.restore_params(run, _abstract_params(run))[1]
    with pytest.raises(JaxgptError, match=r"non-finite at step \d+ \(.*nan") as stop:
        resume(run, **{"train.steps": 20, "train.lr": 1e6, "train.save_every": 1, "train.eval_every": 1})
    bad_step = int(str(stop.value).split("step ")[1].split()[0])
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert max(saved) < bad_step and best_before in saved  # the real best is kept
    metas = [json.loads((run / "checkpoints" / str(s) / "meta" / "metadata").read_text()) for s in saved]
    assert all(np.isfinite(m["val_loss"]) for m in metas)
    assert all(np.isfinite(r.get("val_loss", 0)) and np.isfinite(r["train_loss"]) for r in metric_rows(run))
    params, best = ckpt_lib.restore_params(run, _abstract_params(run))
    assert best == best_before and all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))
    assert ckpt_lib.ranker("val_loss", "min")({"val_loss": float("nan")}) == float("inf")  # NaN never ranks best
    assert ckpt_lib.ranker("eval_reward", "max")({"eval_reward": float("nan")}) == -float("inf")
    shutil.rmtree(run / "checkpoints")  # start the good run again from its best checkpoint
    shutil.copytree(base_run / "checkpoints", run / "checkpoints")
    resume(run, **{**RUN_STEPS, "train.steps": 8})  # the usual learning rate resumes from the good checkpoint
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 9))


def _abstract_params(run_dir):
    from jaxgpt.model import init_params

    cfg = config.load_json(run_dir / "config.json")
    return jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))


# ---- 4. checksums: damage is found, moved aside, and never silently restarts -----------------------

def _damage(run_dir, step, how):
    data = max((run_dir / "checkpoints" / str(step) / "params").rglob("ocdbt.process_0/d/*"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    if how == "flip64":
        raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    else:  # a zeroed 4 KiB block, as a bad sector leaves it
        raw[mid - mid % 4096:mid - mid % 4096 + 4096] = bytes(4096)
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["flip64", "zero4k"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(run, how):
    _damage(run, 6, how)
    with pytest.warns(UserWarning, match="step 6 in .* is damaged"):
        model = jaxgpt.load(run)  # inference only reads: it falls back without moving anything
    assert model.step == 4 and (run / "checkpoints" / "6").is_dir()
    with pytest.warns(UserWarning, match="checkpoint step 6 is damaged"):
        resume(run, **{"train.steps": 8})
    assert (run / "corrupt_checkpoints" / "6").is_dir()
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 9))


def test_every_checkpoint_damaged_is_an_error_not_a_restart(run, capsys):
    _damage(run, 4, "flip64")
    _damage(run, 6, "zero4k")
    with pytest.warns(UserWarning):
        rc, err = cli(capsys, "train", "--run-dir", run)
    assert rc == 2
    one_line(err, "no good checkpoint", "step 6", "step 4", "corrupt_checkpoints")
    rc, err = cli(capsys, "train", "--run-dir", run)  # still refused the next time: never a silent restart
    assert rc == 2 and one_line(err, "no good checkpoint")
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 7))


# ---- 5. torn writes, locks, full disks and permissions ----------------------------------------------

def test_partial_metrics_line_is_repaired_on_resume(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train_lo')  # the disk filled up mid-line
    resume(run, **{"train.steps": 8})
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 9))


def test_damaged_config_or_tokenizer_is_one_line(run, capsys):
    tok = run / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text()[:40])
    rc, err = cli(capsys, "generate", "--run-dir", run, "--max-new-tokens", "4")
    assert rc == 2 and one_line(err, "tokenizer.json' is damaged")
    (run / "config.json").write_text("")
    for command in (["train", "--run-dir", run, "train.steps=8"], ["generate", "--run-dir", run]):
        rc, err = cli(capsys, *command)
        assert rc == 2 and one_line(err, "config.json' is damaged (empty)")


def test_second_process_on_a_run_dir_gets_the_holders_pid(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from jaxgpt.files import RunDirLock
        lock = RunDirLock(sys.argv[1]).__enter__()
        print("locked", flush=True)
        time.sleep(120)
        """), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (run / "metrics.jsonl").read_text()
        rc, err = cli(capsys, "train", "--run-dir", run, "train.steps=8")
        assert rc == 2 and one_line(err, f"in use by process {holder.pid}")
        assert (run / "metrics.jsonl").read_text() == before  # no duplicate lines
    finally:
        holder.kill()
        holder.wait()
    assert cli(capsys, "train", "--run-dir", run, "train.steps=8")[0] == 0  # kill -9 released the lock


def test_full_disk_is_one_line_and_the_run_dir_resumes(run):
    # Every file capped at 300 KB (as a nearly full disk): the next checkpoint cannot be written.
    small_disk = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000)); os.execv(sys.argv[1], sys.argv[1:])")
    command = [sys.executable, "-m", "jaxgpt.cli", "train", "--run-dir", str(run), "train.steps=8"]
    full = subprocess.run([sys.executable, "-c", small_disk] + command, capture_output=True, text=True, timeout=300)
    assert full.returncode == 2
    one_line(full.stderr, "disk full writing", str(run), "run the same command again")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 9))


def test_permission_denied_is_one_line_and_the_run_dir_resumes(run, capsys, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):  # as a read-only mount answers (the tests run as root: chmod is moot)
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", read_only)
    rc, err = cli(capsys, "train", "--run-dir", run, "train.steps=8")
    assert rc == 2 and one_line(err, "permission denied writing", str(run))
    monkeypatch.undo()
    assert cli(capsys, "train", "--run-dir", run, "train.steps=8")[0] == 0
    # Orbax reports OS errors as text; the path is still named.
    text = ValueError('Error writing "x": Failed writing: "/data/run/checkpoints/8/d/ab": Permission denied')
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = text
    assert "permission denied writing '/data/run/checkpoints/8/d/ab'" in files.os_error_message(wrapped)


# ---- 6. command-line values ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--checkpoint", "foo"], "--checkpoint"), (["--temperature", "nan"], "--temperature must be a finite"),
    (["--temperature", "inf"], "finite"), (["--num-beams", "0"], "--num-beams must be at least 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens"), (["--top-p", "0"], "--top-p"),
    (["--num-samples", "0"], "--num-samples"), (["--repetition-penalty", "nan"], "--repetition-penalty"),
])
def test_bad_generate_values_are_one_line(tmp_path, capsys, flags, words):
    rc, err = cli(capsys, "generate", "--run-dir", tmp_path, *flags)  # checked before the run dir is read
    assert rc == 2 and one_line(err, words)


def test_bad_export_values_are_one_line(tmp_path, capsys):
    rc, err = cli(capsys, "export", "--run-dir", tmp_path, "--out", tmp_path / "o", "--batch-sizes", "0,8")
    assert rc == 2 and one_line(err, "--batch-sizes")


def test_pickle_named_safetensors_is_refused_unexecuted(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    cfg = config.load(None, {"model.preset": "tiny", "model.vocab_size": 64})
    (folder / "config.json").write_text(json.dumps(hf.hf_config_from_model(cfg.model, 64)))
    canary = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (canary,))

    (folder / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(JaxgptError, match="not a valid safetensors file"):
        hf.hf_to_params(folder)
    assert not canary.exists()


# ---- kill -9 anywhere, then resume: same metrics, and the best checkpoint never gets worse ----------

def _best_val_loss(run_dir):
    values = [json.loads((p / "meta" / "metadata").read_text())["val_loss"]
              for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit() and (p / "meta" / "metadata").is_file()]
    return min(values, default=float("inf"))


def test_kill_9_anywhere_then_resume_equals_uninterrupted(tmp_path, corpus_dir, train_tiny):
    steps = 10
    overrides = {**RUN_STEPS, "train.steps": steps, "model.preset": "tiny", "model.block_size": 32,
                 "data.source": f"file:{corpus_dir}/*.txt", "data.tokenizer": "char",
                 "data.cache_dir": str(tmp_path / "cache"), "train.eval_batches": 1, "train.progress": False}
    train(config.load(None, overrides), tmp_path / "reference")
    reference = metric_rows(tmp_path / "reference")

    rng = random.Random(1234)  # a fixed seed: the same kill points on every run of the suite
    first, second = sorted(rng.sample(range(1, steps // 2), 1) + rng.sample(range(steps // 2, steps), 1))
    plan = [(first + first % 2, "save"), (second, rng.choice(["mid-line", "step"]))]  # saves are at even steps
    cfg = tmp_path / "run.yaml"  # JSON is YAML: the same settings as a config file for `jaxgpt train --config`
    nested = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    cfg.write_text(json.dumps(nested))
    run_dir, best = tmp_path / "killed", [float("inf")]

    def best_never_worse(kill_at, where):
        now = _best_val_loss(run_dir)
        assert now <= best[0], f"best checkpoint got worse after a kill at step {kill_at} ({where})"
        best[0] = now

    kill_then_resume(["train", "--config", cfg, "--run-dir", run_dir], plan, best_never_worse)
    resumed = metric_rows(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for key in ("train_loss", "val_loss", "grad_norm"):
        np.testing.assert_allclose([r.get(key, 0.0) for r in resumed], [r.get(key, 0.0) for r in reference],
                                   rtol=1e-6, err_msg=key)
    assert best[0] == min(r["val_loss"] for r in reference if "val_loss" in r)
