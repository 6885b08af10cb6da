"""`model.dtype=auto`: bfloat16 compute where bf16 matrix products are native, float32 elsewhere.

TPUs and GPUs always take bfloat16. CPUs differ chip by chip (AVX-512 BF16 or AMX run bf16 products at
about twice float32; AVX2-only chips emulate them and run slower than float32), so on a CPU the choice
is measured once: a bf16 matmul with float32 accumulation (what the model's dots do) against a float32
one. The answer is cached per chip and jax version in `~/.cache/jaxgpt/precision.json`.
`JAXGPT_AUTO_DTYPE=float32|bfloat16` overrides the choice (tests pin it so reference numbers hold).
"""

from __future__ import annotations

import functools
import json
import os
import platform
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_MIN_SPEEDUP = 1.2  # bf16 must beat float32 clearly: its rounding costs a little accuracy


@functools.lru_cache(maxsize=1)
def auto_dtype() -> str:
    """The compute dtype `model.dtype=auto` means on this process's default device."""
    import jax

    forced = os.environ.get("JAXGPT_AUTO_DTYPE", "")
    if forced:
        if forced not in DTYPES[1:]:
            raise ValueError(f"JAXGPT_AUTO_DTYPE must be one of {', '.join(DTYPES[1:])}, got '{forced}'")
        return forced
    if jax.default_backend() != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "float32"


def describe_auto() -> str:
    """One line for logs: what `auto` chose here and why."""
    import jax

    if os.environ.get("JAXGPT_AUTO_DTYPE"):
        return f"model.dtype=auto -> {auto_dtype()} (JAXGPT_AUTO_DTYPE)"
    if jax.default_backend() != "cpu":
        return f"model.dtype=auto -> bfloat16 ({jax.default_backend()})"
    return (f"model.dtype=auto -> {auto_dtype()} (bf16 matmuls {cpu_bf16_speedup():.2f}x float32 on this CPU; "
            f"bf16 needs >= {BF16_MIN_SPEEDUP}x)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    return Path(os.environ.get("JAXGPT_CACHE_DIR", "~/.cache/jaxgpt")).expanduser() / "precision.json"


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """float32 matmul time / bf16 (f32-accumulating) matmul time on this CPU: measured once, then cached."""
    import jax

    key = f"{_cpu_name()} | {os.cpu_count()} cpus | jax {jax.__version__}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    speedup = _measure_speedup()
    try:  # best effort: a read-only home only means measuring again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**(cached if isinstance(cached, dict) else {}), key: round(speedup, 3)}) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
    return speedup


def _measure_speedup() -> float:
    import jax.numpy as jnp

    from jaxgpt.perf import measured_matmul_flops

    f32 = measured_matmul_flops(dtype=jnp.float32, repeats=7)
    bf16 = measured_matmul_flops(dtype=jnp.bfloat16, repeats=7)
    f32 = max(f32, measured_matmul_flops(dtype=jnp.float32, repeats=7))  # alternate: a burst of load hurts neither alone
    return bf16 / f32
