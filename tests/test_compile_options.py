"""Decoding programs compile with YNNPACK kept to the dots on CPU, and fall back when XLA lacks the option."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import compile_options


def test_decode_programs_get_the_cpu_options_and_still_compute_the_same():
    want = compile_options._CPU_DECODE if jax.default_backend() == "cpu" else None  # CPU-only options
    assert compile_options.decode_options() == want
    f = lambda x: (x[:, None, :] * x[None]).sum(-1)  # noqa: E731 - a multiply-reduce, as in decode attention
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)
    np.testing.assert_allclose(compile_options.decode_jit(f)(x), jax.jit(f)(x), rtol=1e-6)


def test_an_option_this_xla_refuses_means_no_options(monkeypatch):
    monkeypatch.setattr(compile_options, "_CPU_DECODE", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_VALUE"})
    compile_options.decode_options.cache_clear()
    try:
        assert compile_options.decode_options() is None
        assert float(compile_options.decode_jit(lambda x: x.sum())(jnp.ones(3))) == 3.0
    finally:
        compile_options.decode_options.cache_clear()
