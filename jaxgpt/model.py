"""GPT-2 as a functional Flax linen module.

Shape letters used in names: B batch, T query length, S key length (the KV cache), D model width,
H heads, K head width, F MLP width (4D), V vocabulary.

Parameter names follow GPT-2's (wte, wpe, h_N/ln_1, attn/c_attn, attn/c_proj, ln_2, mlp/c_fc,
mlp/c_proj, ln_f), so importing a GPT-2 checkpoint is a rename-and-reshape table. Every parameter
carries logical axis names; `jaxgpt.sharding` maps them onto a device mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.attention import ATTENTION, attend, attention_mask
from jaxgpt.config import ModelConfig, dtype_of
from jaxgpt.precision import DTYPES

Cache = dict[str, dict[str, jax.Array]]  # {"h_0": {"k": BxSxHxK, "v": BxSxHxK}, ...}


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def mixed_dot(x, w, n_in: int) -> jax.Array:
    """x . w over x's last `n_in` dims, in the inputs' dtype with a float32 result. For bf16 inputs the custom
    gradient keeps both backward dots in bf16 with f32 accumulation too (autodiff alone would run them in f32)."""
    # One row axis: XLA's CPU dots then take the weight gradient without a transposed copy of the
    # activations (the whole MLP's fwd+bwd about 1.2x faster at "small" shapes).
    batch, features = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    y = _rows_dot(x.reshape(-1, *features), w, n_in)
    return y.reshape(*batch, *y.shape[1:])


def _letters(n_in: int, n_out: int) -> tuple[str, str]:
    return "ijkl"[:n_in], "mnop"[:n_out]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows_dot(x_NxI, w_IxO, n_in: int) -> jax.Array:
    i, o = _letters(n_in, w_IxO.ndim - n_in)
    return jnp.einsum(f"a{i},{i}{o}->a{o}", x_NxI, w_IxO, preferred_element_type=jnp.float32)


def _rows_dot_fwd(x_NxI, w_IxO, n_in):
    return _rows_dot(x_NxI, w_IxO, n_in), (x_NxI, w_IxO)


def _rows_dot_bwd(n_in, residuals, g_NxO):
    x_NxI, w_IxO = residuals
    i, o = _letters(n_in, w_IxO.ndim - n_in)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    g_NxO = g_NxO.astype(x_NxI.dtype)
    dx_NxI = f32(f"a{o},{i}{o}->a{i}", g_NxO, w_IxO).astype(x_NxI.dtype)
    if len(o) == 1:
        dw_IxO = f32(f"a{i},a{o}->{i}{o}", x_NxI, g_NxO)
    else:  # the first output axis as a batch axis: XLA's CPU runtime has no bf16 dot with several output axes
        dw_IxO = jnp.moveaxis(f32(f"a{i},a{o}->{o[0]}{i}{o[1:]}", x_NxI, g_NxO), 0, n_in)
    return dx_NxI, dw_IxO.astype(w_IxO.dtype)


_rows_dot.defvjp(_rows_dot_fwd, _rows_dot_bwd)


class Linear(nn.Module):
    """Contract the last `n_in` dims of x with the first `n_in` dims of the kernel, plus a bias."""

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    n_in: int = 1
    std: float = 0.02
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_rank: int = 0  # > 0: add a low-rank update x @ lora_A @ lora_B * lora_alpha / lora_rank
    lora_alpha: float = 16.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_normal(self.std), self.kernel_axes),
            self.kernel_shape, self.param_dtype)
        contract_x = tuple(range(x.ndim - self.n_in, x.ndim))
        # f32 accumulation even for bf16 inputs; the result goes back to the compute dtype.
        y = mixed_dot(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.n_in:]),
                self.kernel_shape[self.n_in:], self.param_dtype)
            y = y + bias.astype(jnp.float32)
        if self.lora_rank:
            y = y + self._lora(x, contract_x)
        return y.astype(self.dtype)

    def _lora(self, x: jax.Array, contract_x: tuple[int, ...]) -> jax.Array:
        # B starts at zero, so an untrained adapter leaves the output exactly unchanged.
        r, in_shape, out_shape = self.lora_rank, self.kernel_shape[:self.n_in], self.kernel_shape[self.n_in:]
        a = self.param("lora_A", nn.with_logical_partitioning(_normal(1 / math.sqrt(math.prod(in_shape))),
                       (*self.kernel_axes[:self.n_in], None)), (*in_shape, r), self.param_dtype)
        b = self.param("lora_B", nn.with_logical_partitioning(nn.initializers.zeros,
                       (None, *self.kernel_axes[self.n_in:])), (r, *out_shape), self.param_dtype)
        h = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype),
                                ((contract_x, tuple(range(self.n_in))), ((), ())), preferred_element_type=jnp.float32)
        y = jax.lax.dot_general(h, b.astype(jnp.float32), (((h.ndim - 1,), (0,)), ((), ())))
        return y * (self.lora_alpha / r)


def lora_rank_for(cfg: ModelConfig, name: str) -> int:
    """cfg.lora_rank if `name` ('attn/c_attn', 'mlp/c_proj', ...) or its last part is in cfg.lora_targets, else 0."""
    targets = {t.strip() for t in cfg.lora_targets.split(",") if t.strip()}
    return cfg.lora_rank if name in targets or name.split("/")[1] in targets else 0


def _linear_lora(cfg: ModelConfig, name: str) -> dict[str, Any]:
    return {"lora_rank": lora_rank_for(cfg, name), "lora_alpha": cfg.lora_alpha}


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (eps as in GPT-2)."""

    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        D = x_BxTxD.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (D,),
                           self.param_dtype)
        x = x_BxTxD.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (D,),
                              self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, mask, cache, cache_index, deterministic):
        cfg = self.cfg
        H, D = cfg.n_head, cfg.n_embd
        K = D // H
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        qkv_BxTx3xHxK = Linear((D, 3, H, K), ("embed", None, "heads", "kv"), use_bias=cfg.bias,
                               dtype=dtype, param_dtype=pdtype, name="c_attn", **_linear_lora(cfg, "attn/c_attn"))(x_BxTxD)
        qkv_BxTx3xHxK = nn.with_logical_constraint(qkv_BxTx3xHxK, ("batch", "length", None, "heads", "kv"))
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
        new_cache = None
        if cache is not None:
            # Write this chunk's keys/values into the preallocated cache, then attend over all of it.
            k_BxSxHxK = jax.lax.dynamic_update_slice(cache["k"], k_BxTxHxK.astype(cache["k"].dtype),
                                                     (0, cache_index, 0, 0))
            v_BxSxHxK = jax.lax.dynamic_update_slice(cache["v"], v_BxTxHxK.astype(cache["v"].dtype),
                                                     (0, cache_index, 0, 0))
            new_cache = {"k": k_BxSxHxK, "v": v_BxSxHxK}
            k_BxTxHxK, v_BxTxHxK = k_BxSxHxK.astype(dtype), v_BxSxHxK.astype(dtype)
        if cfg.dropout > 0 and not deterministic:
            out_BxTxHxK = self._attend_with_dropout(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask)
        else:  # splash (TPU), cuDNN (NVIDIA), blockwise (CPU) or XLA: see jaxgpt/attention.py
            out_BxTxHxK = attend(cfg.attention, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask)
        y_BxTxD = Linear((H, K, D), ("heads", "kv", "embed"), n_in=2, std=0.02 / math.sqrt(2 * cfg.n_layer),
                         use_bias=cfg.bias, dtype=dtype, param_dtype=pdtype, name="c_proj",
                         **_linear_lora(cfg, "attn/c_proj"))(out_BxTxHxK)
        y_BxTxD = nn.Dropout(cfg.dropout)(y_BxTxD, deterministic=deterministic)
        return y_BxTxD, new_cache

    def _attend_with_dropout(self, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask):
        # jax.nn.dot_product_attention has no dropout, so training with attention dropout spells it out.
        T, S, K = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1], q_BxTxHxK.shape[-1]
        logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                                    preferred_element_type=jnp.float32) / math.sqrt(K)
        if mask is None:
            mask = attention_mask(T, S, 0, None)
        logits_BxHxTxS = jnp.where(mask, logits_BxHxTxS, jnp.finfo(jnp.float32).min)
        probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
        probs_BxHxTxS = nn.Dropout(self.cfg.dropout)(probs_BxHxTxS, deterministic=False)
        return jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic):
        cfg = self.cfg
        D, F = cfg.n_embd, 4 * cfg.n_embd
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        h_BxTxF = Linear((D, F), ("embed", "mlp"), use_bias=cfg.bias, dtype=dtype, param_dtype=pdtype,
                         name="c_fc", **_linear_lora(cfg, "mlp/c_fc"))(x_BxTxD)
        h_BxTxF = jax.nn.gelu(h_BxTxF, approximate=True)  # GPT-2's tanh GELU
        y_BxTxD = Linear((F, D), ("mlp", "embed"), std=0.02 / math.sqrt(2 * cfg.n_layer), use_bias=cfg.bias,
                         dtype=dtype, param_dtype=pdtype, name="c_proj", **_linear_lora(cfg, "mlp/c_proj"))(h_BxTxF)
        return nn.Dropout(cfg.dropout)(y_BxTxD, deterministic=deterministic)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, mask, cache, cache_index, deterministic):
        cfg = self.cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        h_BxTxD = LayerNorm(cfg.bias, dtype, pdtype, name="ln_1")(x_BxTxD)
        a_BxTxD, new_cache = CausalSelfAttention(cfg, name="attn")(h_BxTxD, mask, cache, cache_index, deterministic)
        x_BxTxD = x_BxTxD + a_BxTxD
        h_BxTxD = LayerNorm(cfg.bias, dtype, pdtype, name="ln_2")(x_BxTxD)
        x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(h_BxTxD, deterministic)
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
        return x_BxTxD, new_cache


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _ScanStep(nn.Module):
    """One block as a scan step: (x, broadcast mask) -> (x, nothing)."""

    block: Any
    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxTxD, mask):
        x_BxTxD, _ = self.block(self.cfg, name="block")(x_BxTxD, mask, None, 0, self.deterministic)
        return x_BxTxD, None


class GPT(nn.Module):
    """Decoder-only Transformer; returns (logits_BxTxV in float32, updated cache or None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, *, cache: Cache | None = None, cache_index: Any = 0,
                 start_B: jax.Array | None = None, deterministic: bool = True,
                 return_hidden: bool = False):
        """`cache_index` is the cache slot of tokens_BxT[:, 0]; `start_B` counts left-padding slots per row."""
        cfg = self.cfg
        B, T = tokens_BxT.shape
        if cache is None and T > cfg.block_size:  # a position-table lookup past the end would clamp silently
            raise ValueError(f"sequence of {T} tokens is longer than block_size {cfg.block_size}")
        V, D = cfg.vocab_size, cfg.n_embd
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        wte_VxD = self.param("wte", nn.with_logical_partitioning(_normal(0.02), ("vocab", "embed")), (V, D), pdtype)
        wpe_PxD = self.param("wpe", nn.with_logical_partitioning(_normal(0.01), (None, "embed")),
                             (cfg.block_size, D), pdtype)
        slot_BxT = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
        positions_BxT = slot_BxT if start_B is None else jnp.maximum(slot_BxT - start_B[:, None], 0)
        x_BxTxD = (wte_VxD[tokens_BxT] + wpe_PxD[positions_BxT]).astype(dtype)
        x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=deterministic)
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))

        S = T if cache is None else cache["h_0"]["k"].shape[1]
        # Plain causal training uses is_causal (cuDNN flash attention takes it); anything else a mask.
        mask = None if cache is None and start_B is None else attention_mask(T, S, cache_index, start_B)
        block = Block if cfg.remat == "none" else nn.remat(
            Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(5,))  # arg 5 (self = 0): deterministic
        new_cache = {} if cache is not None else None
        if cfg.scan_layers:
            if cache is not None:
                raise ValueError("decoding needs unrolled layers: load the params through unstack_layers()")
            scanned = nn.scan(_ScanStep, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,), length=cfg.n_layer,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxTxD, _ = scanned(block, cfg, deterministic, name="h")(x_BxTxD, mask)
        for i in range(0 if cfg.scan_layers else cfg.n_layer):
            name = f"h_{i}"
            x_BxTxD, layer_cache = block(cfg, name=name)(
                x_BxTxD, mask, None if cache is None else cache[name], cache_index, deterministic)
            if cache is not None:
                new_cache[name] = layer_cache
        h_BxTxD = LayerNorm(cfg.bias, dtype, pdtype, name="ln_f")(x_BxTxD)
        if return_hidden:
            return h_BxTxD, new_cache
        return lm_logits(h_BxTxD, wte_VxD), new_cache


def lm_logits(h_BxTxD: jax.Array, wte_VxD: jax.Array) -> jax.Array:
    """The tied LM head: float32 logits (so the softmax and loss are) from hidden states in the compute dtype."""
    return jnp.einsum("btd,vd->btv", h_BxTxD, wte_VxD.astype(h_BxTxD.dtype), preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    """Zeroed keys/values for every layer: BxSxHxK each."""
    K = cfg.n_embd // cfg.n_head
    shape = (batch, length, cfg.n_head, K)
    dtype = dtype or dtype_of(cfg.dtype)
    return {f"h_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for i in range(cfg.n_layer)}


def validate(cfg: ModelConfig) -> None:
    from jaxgpt.errors import JaxgptError

    if cfg.n_embd % cfg.n_head:
        raise JaxgptError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head ({cfg.n_head})")
    if min(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) <= 0:
        raise JaxgptError("model.n_layer, n_head, n_embd, block_size and vocab_size must all be positive")
    if not 0 <= cfg.dropout < 1:
        raise JaxgptError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.attention not in ATTENTION:
        raise JaxgptError(f"model.attention must be one of {', '.join(ATTENTION)}; got '{cfg.attention}'")
    if cfg.dtype not in DTYPES:
        raise JaxgptError(f"model.dtype must be one of {', '.join(DTYPES)}; got '{cfg.dtype}'")
    if cfg.param_dtype not in DTYPES[1:]:
        raise JaxgptError(f"model.param_dtype must be one of {', '.join(DTYPES[1:])}; got '{cfg.param_dtype}'")
    if cfg.remat not in ("none", *REMAT_POLICIES):
        raise JaxgptError(f"model.remat must be one of none, {', '.join(REMAT_POLICIES)}; got '{cfg.remat}'")


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Unboxed parameter pytree (plain arrays)."""
    validate(cfg)
    tokens = jnp.zeros((1, min(cfg.block_size, 8)), jnp.int32)
    return nn.unbox(GPT(cfg).init(rng, tokens)["params"])


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM/nanoGPT estimate."""
    T = seq_len or cfg.block_size
    D, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    matmul_params = L * 12 * D * D + V * D  # blocks + tied LM head
    return 6 * matmul_params + 12 * L * D * T


def merge_lora(params, cfg: ModelConfig):
    """Fold every adapter into its kernel (kernel + A @ B * alpha / r): params for lora_rank=0."""
    if "h" in params:  # scanned layers: merge layer by layer
        return stack_layers(merge_lora(unstack_layers(params, cfg.n_layer), cfg), cfg.n_layer)

    def merge(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: merge(v) for k, v in tree.items() if k not in ("lora_A", "lora_B")}
        if "lora_A" in tree:
            a, b = tree["lora_A"].astype(jnp.float32), tree["lora_B"].astype(jnp.float32)
            delta = jnp.tensordot(a, b, axes=1) * (cfg.lora_alpha / cfg.lora_rank)
            out["kernel"] = (tree["kernel"].astype(jnp.float32) + delta).astype(tree["kernel"].dtype)
        return out

    return merge(params)


def unstack_layers(params, n_layer: int):
    """Scanned params ({"h": {"block": stacked}}) -> the unrolled layout (h_0 ... h_{L-1})."""
    if "h" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "h"}
    for i in range(n_layer):
        out[f"h_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["h"]["block"])
    return out


def stack_layers(params, n_layer: int):
    """The unrolled layout -> scanned params (layers stacked on a leading axis)."""
    if "h" in params:
        return params
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = {"block": jax.tree.map(lambda *a: jnp.stack(a), *(params[f"h_{i}"] for i in range(n_layer)))}
    return out
