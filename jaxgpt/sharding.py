"""The device mesh and the one table that maps the model's logical axes onto it.

Mesh axes: `data` (batch only), `fsdp` (batch and parameters, ZeRO-3 style), `tensor` (heads and the
MLP hidden, Megatron style). Changing `mesh.*` in the config is all it takes to move between them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.config import MeshConfig
from jaxgpt.errors import JaxgptError

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes); anything unnamed is replicated.
RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise JaxgptError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (meaning 'the rest')")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or n_devices % known:
        raise JaxgptError(f"mesh {tuple(sizes)} does not fit {n_devices} devices; sizes must multiply to the "
                          "device count (use -1 for one axis to take the rest)")
    sizes = [n_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n_devices:
        raise JaxgptError(f"mesh {tuple(sizes)} uses {math.prod(sizes)} devices but {n_devices} are present")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU and odd topologies: plain order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def logical_shardings(abstract_boxed_tree, mesh: Mesh):
    """NamedShardings for a tree whose leaves carry logical axis names (nn.Partitioned)."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows across (data, fsdp); any further dims whole (fits batch arrays of every rank)."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, global_size: int) -> dict[str, jax.Array]:
    """This host's rows -> one global array per key, laid out along the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_size, *v.shape[1:]))
            for k, v in local_batch.items()}


def process_rows(process_DxFxT: np.ndarray, global_batch_size: int, process: int,
                 what: str = "train.batch_size") -> slice:
    """The rows of every global batch (of `what`) that `process` loads: those of the (data, fsdp) row blocks
    its devices hold. process_DxFxT: the process of each device of the mesh."""
    D, F, T = process_DxFxT.shape
    if global_batch_size % (D * F):
        raise JaxgptError(f"{what} ({global_batch_size} rows) must be divisible by mesh.data x mesh.fsdp ({D} x {F})")
    blocks = np.flatnonzero((process_DxFxT.reshape(D * F, T) == process).any(axis=1))
    if len(blocks) == 0 or blocks[-1] - blocks[0] + 1 != len(blocks):
        raise JaxgptError("this mesh gives a host non-contiguous batch rows; order the devices by host")
    size = global_batch_size // (D * F)
    return slice(int(blocks[0]) * size, int(blocks[-1] + 1) * size)


def host_rows(mesh: Mesh, global_batch_size: int, what: str = "train.batch_size") -> slice:
    """The rows of every global batch that this process's devices hold (and so the rows it loads)."""
    owners_DxFxT = np.vectorize(lambda d: d.process_index)(mesh.devices)
    return process_rows(owners_DxFxT, global_batch_size, jax.process_index(), what)
