"""int8 weight-only quantization: symmetric, one float32 scale per output channel, dequantized under jit.

A quantized weight is a `QArray` pytree (int8 values + float32 scales) that stands in for the float array
in the params pytree. The model reads weights only through `.astype(dtype)` (kernels, the tied LM head)
and indexing (the embedding lookup); `QArray` dequantizes in both, so every jitted function that applies
`GPT(cfg)` (generate, streaming, chat, perplexity, beam search) traces `int8 -> float * scale` into its own
XLA program, where it fuses with the weight's use. Nothing outside this file knows about quantization.

What is quantized: every matmul kernel (attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj) and, by default,
the token embedding `wte`, because the LM head is tied to it (for GPT-2 124M it is 31% of the weights).
Its scales are per vocabulary row: the head's output channel, and a per-token scale for the lookup.
Biases, LayerNorms, the position embedding `wpe` and LoRA adapters stay float: they are small.

Per channel c with scale s_c = max|w_c| / 127, q = round(w / s_c) in [-127, 127], so |w - q s_c| <= s_c / 2.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import JaxgptError

MODES = ("int8",)
# Leading (input) axes of each kernel: attn/c_proj contracts (heads, kv); the others contract one axis.
_INPUT_AXES = {("attn", "c_attn"): 1, ("attn", "c_proj"): 2, ("mlp", "c_fc"): 1, ("mlp", "c_proj"): 1}


@jax.tree_util.register_pytree_node_class
class QArray:
    """int8 values `q` and float32 `scale` (broadcastable to q); reads as a float array of `dtype`."""

    def __init__(self, q, scale, dtype: str = "float32"):
        # No checks here: jax rebuilds pytrees with placeholder leaves during tracing.
        self.q, self.scale, self._dtype = q, scale, dtype

    def tree_flatten(self):
        return (self.q, self.scale), self._dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        return cls(*children, dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def dtype(self):
        return jnp.dtype(self._dtype)

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)

    def dequantize(self, dtype=None) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype or self.dtype)

    def astype(self, dtype) -> jax.Array:
        return self.dequantize(dtype)

    def __getitem__(self, idx) -> jax.Array:
        if self.ndim == 2 and self.scale.shape == (self.q.shape[0], 1):
            # Row scales (wte): gather the int8 rows first, so a lookup never dequantizes the whole table.
            return (self.q[idx].astype(jnp.float32) * self.scale[idx]).astype(self.dtype)
        return self.dequantize()[idx]

    def __repr__(self) -> str:
        shape = lambda x: getattr(x, "shape", x)  # children may be placeholders after a tree.map
        return f"QArray(q={shape(self.q)} int8, scale={shape(self.scale)}, dtype={self._dtype})"


def quantize_array(w, n_in: int) -> QArray:
    """Symmetric int8 over the leading `n_in` (input) axes: one scale per output channel."""
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=tuple(range(n_in)), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # an all-zero channel keeps scale 1 (q = 0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return QArray(q, scale.astype(jnp.float32), jnp.dtype(w.dtype).name)


def quantize_params(params, mode: str = "int8", embeddings: bool = True):
    """The params pytree with every matmul kernel (and `wte` if `embeddings`) as a QArray."""
    if mode not in MODES:
        raise JaxgptError(f"unknown quantization '{mode}'; choose one of: {', '.join(MODES)}")
    if "h" in params:
        raise JaxgptError("quantize unrolled layers: load the params through model.unstack_layers() first")
    if is_quantized(params):
        return params
    return _quantize_tree(params, embeddings)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_tree(params, embeddings: bool):
    """One compiled program for the whole tree (eagerly, each op on each shape would compile on its own)."""

    def walk(tree, path: tuple[str, ...]):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for k, v in tree.items():
            n_in = _INPUT_AXES.get(path[-2:]) if k == "kernel" else None
            if n_in is not None:
                out[k] = quantize_array(v, n_in)
            elif k == "wte" and not path and embeddings:
                out[k] = _quantize_rows(v)
            else:
                out[k] = walk(v, (*path, k))
        return out

    return walk(params, ())


def _quantize_rows(w_VxD) -> QArray:
    # Transposed view: rows are the LM head's output channels, so reduce over the last axis.
    qt = quantize_array(jnp.asarray(w_VxD).T, 1)
    return QArray(qt.q.T, qt.scale.T, qt._dtype)


def dequantize_params(params):
    """Plain float params (what the quantized model computes with)."""
    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, QArray))


def is_quantized(params) -> bool:
    return any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))


def param_bytes(params) -> int:
    """Bytes the params occupy (int8 values + scales for QArrays)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def max_channel_error(w, qa: QArray) -> dict[str, Any]:
    """Largest |w - dequant(q)| relative to its channel's bound s/2 (<= 1 when rounding is exact)."""
    err = jnp.abs(jnp.asarray(w, jnp.float32) - qa.dequantize(jnp.float32))
    return {"max_abs": float(err.max()), "max_over_bound": float(jnp.max(err / (qa.scale / 2)))}
