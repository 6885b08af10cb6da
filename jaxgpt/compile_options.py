"""XLA compiler options for the programs that decode token by token.

On CPUs XLA hands dots, elementwise ops and reductions to YNNPACK by default. A decoding step is small:
its attention is a multiply-and-reduce over the KV cache (attention.single_query_attention), and YNNPACK's
reduction fusions ran it several times slower than XLA's own loops. `decode_jit` keeps YNNPACK to the
dots in decoding programs only (training is no faster that way): "small" at batch 8, 970 -> 1,330 new
tokens/s on a 2-core EPYC. The options are set per program, so a user's XLA_FLAGS still govern the rest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CPU_DECODE = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=1)
def decode_options() -> dict[str, str] | None:
    """The options on this backend; None where there are none, or where this jaxlib does not know them."""
    if jax.default_backend() != "cpu":
        return None
    try:  # an XLA without the option refuses to compile: decode with the defaults rather than not at all
        jax.jit(lambda x: x.sum(), compiler_options=_CPU_DECODE)(jnp.ones(2))
    except Exception:  # noqa: BLE001 - any refusal means "not supported here"
        return None
    return dict(_CPU_DECODE)


def decode_jit(fn, **jit_kwargs):
    """jax.jit for a decoding program (prefill, decode loop, server step) with decode_options()."""
    return jax.jit(fn, compiler_options=decode_options(), **jit_kwargs)
