"""Fine-tune, GRPO and DPO on a mesh equal one device; each host loads only its rows of a global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import sharding
from jaxgpt.errors import JaxgptError
from jaxgpt.finetune import batches as batch_lib
from jaxgpt.rl import dpo

HERE = Path(__file__).parent
MODES = ["classify", "sft", "grpo", "dpo"]
MESHES = ["(8, 1, 1)", "(2, 2, 2)"]


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, str(HERE / "mesh_mode_checks.py")], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("mode", MODES)
def test_step_on_mesh_equals_one_device(results, mode, mesh):
    got = results[f"{mode} {mesh}"]
    # Sums split over shards reassociate (~1e-7 relative); Adam's division by sqrt(v) grows that in the weights.
    np.testing.assert_allclose(got["losses"], got["ref_losses"], rtol=1e-5, atol=1e-6)
    assert got["losses"][0] != got["losses"][-1]  # the updates changed the model
    assert got["max_state_diff"] < 5e-5  # params and optimizer state after the steps


@pytest.mark.parametrize("mode", MODES)
def test_state_and_batch_are_split(results, mode):
    # c_fc kernel (embed=64, mlp=256): embed -> fsdp, mlp -> tensor; its Adam moments follow it.
    data = results[f"{mode} (8, 1, 1)"]
    assert data["kernel_shard"] == [64, 256] and data["moment_shards"] == [[64, 256]]
    split = results[f"{mode} (2, 2, 2)"]
    assert split["kernel_shard"] == [32, 128] and split["moment_shards"] == [[32, 128]]
    for got, row_blocks in ((data, 8), (split, 4)):
        assert got["kernel_sharding_named"] and got["n_devices"] == 8
        assert got["batch_shard"][0] * row_blocks == (16 if mode == "grpo" else 8)


def test_process_rows_agree_with_jax_shardings(results):
    assert results["rows_match_jax"]


@pytest.mark.parametrize("shape,devices_per_process", [(s, d) for s in [(8, 1, 1), (2, 2, 2), (1, 8, 1), (4, 1, 2)]
                                                         for d in (1, 2, 4, 8) if d >= s[2]])
def test_processes_load_disjoint_rows_that_make_the_global_batch(shape, devices_per_process):
    B, n_processes = 16, 8 // devices_per_process
    process_DxFxT = (np.arange(8) // devices_per_process).reshape(shape)
    loaded = [np.arange(B)[sharding.process_rows(process_DxFxT, B, p)] for p in range(n_processes)]
    np.testing.assert_array_equal(np.concatenate(loaded), np.arange(B))  # each row once, in process order
    assert {len(rows) for rows in loaded} == {B // n_processes}


def test_processes_that_share_a_row_block_load_it_both():
    process_DxFxT = (np.arange(8) // 2).reshape(2, 1, 4)  # the tensor axis spans two processes
    rows = [sharding.process_rows(process_DxFxT, 16, p) for p in range(4)]
    assert rows == [slice(0, 8), slice(0, 8), slice(8, 16), slice(8, 16)]


def test_process_rows_refuse_a_batch_the_mesh_cannot_split():
    with pytest.raises(JaxgptError, match=r"rl.prompts_per_step x rl.group_size \(12 rows\) must be divisible"):
        sharding.process_rows(np.zeros((8, 1, 1), int), 12, 0, "rl.prompts_per_step x rl.group_size")


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_finetune_host_rows_stack_to_the_global_batch(task):
    rs = np.random.default_rng(0)
    ids = [rs.integers(1, 50, rs.integers(2, 30)).astype(np.int32) for _ in range(6)]
    enc = (batch_lib.Encoded(ids, label_N=rs.integers(0, 3, 6).astype(np.int32)) if task == "classify" else
           batch_lib.Encoded(ids, in_loss=[(rs.random(len(i)) < 0.5).astype(np.float32) for i in ids]))
    rows = np.asarray([4, 0, 5, 2, 1, 3])[:5]  # 5 examples and 3 filler rows in a batch of 8
    full = batch_lib.make_batch(enc, rows, 8, 64, 0)
    parts = [batch_lib.make_batch(enc, rows, 8, 64, 0, slice(i, i + 2)) for i in range(0, 8, 2)]
    for key, value in full.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)


def test_dpo_host_rows_stack_to_the_global_batch():
    rs = np.random.default_rng(0)
    pairs = [((list(rs.integers(1, 50, rs.integers(3, 20))), 2), (list(rs.integers(1, 50, rs.integers(3, 20))), 1))
             for _ in range(4)]
    full = dpo.pair_batch(pairs, 0, 64)
    parts = [dpo.pair_batch(pairs, 0, 64, slice(i, i + 4)) for i in (0, 4)]  # chosen rows, then rejected rows
    for key, value in full.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
