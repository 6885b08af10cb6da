"""Sharded equals unsharded, on 8 simulated CPU devices (run in a subprocess: the device count is fixed
when JAX starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent


def run_8_devices(script, *args, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def results():
    return run_8_devices("sharded_checks.py")


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)", "(1, 2, 4)", "(2, 2, 2) loss_chunk=5"])
def test_sharded_training_equals_unsharded(results, mesh):
    ref, got = results["(1, 1, 1)"], results[mesh]
    # float32 sums split over shards reassociate: ~1e-7 relative per reduction, a few steps of Adam
    # (which divides by sqrt(v)) amplify that to ~1e-5 in the weights.
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    np.testing.assert_allclose(_flat(got["params"]), _flat(ref["params"]), atol=5e-5)
    assert got["n_devices"] == 8


def _flat(tree):
    if isinstance(tree, dict):
        return np.concatenate([_flat(tree[k]) for k in sorted(tree)])
    return np.ravel(np.asarray(tree, np.float64))


def test_parameters_and_optimizer_state_are_really_split(results):
    # c_fc kernel is (embed=64, mlp=256): embed -> fsdp, mlp -> tensor.
    assert results["(8, 1, 1)"]["c_fc_shard"] == [64, 256]  # data parallel: replicated
    assert results["(1, 8, 1)"]["c_fc_shard"] == [8, 256]  # FSDP: split by rows
    assert results["(1, 2, 4)"]["c_fc_shard"] == [32, 64]  # FSDP x tensor
    assert results["(1, 2, 4)"]["mu_shard"] == [32, 64]  # Adam moments follow their parameters
    # c_attn kernel (embed=64, 3, heads=4, kv=16): whole heads per tensor shard (Megatron).
    assert results["(1, 2, 4)"]["c_attn_shard"] == [32, 3, 1, 16]
