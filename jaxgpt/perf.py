"""Peak FLOP/s for MFU: a table for accelerators, a measurement for CPUs."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak per chip (vendor figures).
PEAK_BF16 = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H200": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def measured_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Median FLOP/s of an n^3 matmul in `dtype` with float32 accumulation (as the model's dots run) on the
    default device: what 'peak' means on a CPU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times))


def peak_flops_per_device(dtype=jnp.float32) -> tuple[float, str]:
    """(FLOP/s, where the number came from). On CPUs the peak of the compute dtype is measured, so bf16
    training is not credited with more than 100% of a float32 peak."""
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16.items():
        if kind.startswith(name):
            return flops, f"{name} bf16 peak"
    name = jnp.dtype(dtype).name
    return measured_matmul_flops(dtype=dtype), f"measured {name} matmul"
