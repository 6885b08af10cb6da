"""Multi-device and multi-process training through the CLI, as users run it (subprocesses, 8 CPU devices)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np


def jaxgpt_train(run_dir, overrides, devices=8, extra=(), cfg_file=None, wait=True):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    args = [sys.executable, "-m", "jaxgpt.cli", "train", "--run-dir", str(run_dir), *extra]
    if cfg_file:
        args += ["--config", str(cfg_file)]
    args += [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows}


def constant_lr(tiny_overrides, **kw):
    # A constant learning rate makes a run to step 6 a prefix of a run to step 12.
    return {**tiny_overrides, "train.warmup_steps": 0, "train.min_lr_ratio": 1.0, "train.save_every": 6,
            "train.eval_every": 6, **kw}


def test_checkpoint_restores_onto_a_different_mesh(tmp_path, tiny_overrides):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    base = constant_lr(tiny_overrides, **{"mesh.data": 8})
    jaxgpt_train(tmp_path / "straight", {**base, "train.steps": 12}, cfg_file=cfg)
    jaxgpt_train(tmp_path / "moved", {**base, "train.steps": 6}, cfg_file=cfg)
    # Resume on an FSDP x tensor mesh: parameters and Adam moments are resharded on restore.
    jaxgpt_train(tmp_path / "moved", {"train.steps": 12, "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "moved")
    assert sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in range(7, 13)], [a[s] for s in range(7, 13)], rtol=1e-5)


def test_two_processes_match_one(tmp_path, tiny_overrides):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    overrides = constant_lr(tiny_overrides, **{"train.steps": 8, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    jaxgpt_train(tmp_path / "single", overrides, cfg_file=cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [jaxgpt_train(tmp_path / "multi", overrides, devices=4, cfg_file=cfg, wait=False,
                          extra=["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)])
             for i in range(2)]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:  # a peer that dies makes the other abort; never leave one hanging
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert sorted(two) == list(range(1, 9))
    np.testing.assert_allclose([two[s] for s in range(1, 9)], [one[s] for s in range(1, 9)], rtol=1e-5)
    # Both processes wrote their parts of one checkpoint; a single process can read it back.
    assert (tmp_path / "multi" / "checkpoints" / "8").is_dir()
    import jaxgpt

    assert jaxgpt.load(tmp_path / "multi", "latest").step == 8
