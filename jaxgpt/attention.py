"""Attention implementations and the one function the model calls: `attend`.

`model.attention=auto` picks per platform (see `choose`):
  TPU     the Pallas splash-attention kernel (flash attention that skips fully masked blocks), for
          sequences of whole 128-token blocks without a KV cache; left padding rides along as segment ids;
  NVIDIA  cuDNN flash attention for bf16/fp16 causal attention without an explicit mask;
  CPU     a blockwise causal path from two blocks on (T >= 256): 1.8x XLA's at T=256, 2.4x at 1024 (fwd+bwd);
  else    XLA's fused dot_product_attention (also the fallback for decoding with a cache).
`xla`, `blockwise`, `cudnn` and `splash` force one path; `splash` off a TPU runs the kernel in Pallas
interpret mode (correct but slow: for tests).

Shape letters as in model.py: B batch, T query length, S key length, H heads, K head width.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION = ("auto", "xla", "blockwise", "cudnn", "splash")
BLOCK = 128  # query/key block of the blockwise and splash paths
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention takes only half-precision inputs


def attention_mask(T: int, S: int, cache_index, start_B: jax.Array | None) -> jax.Array:
    """Bx1xTxS boolean: query t (at slot cache_index+t) sees key slots <= its own, not left padding."""
    query_slot_T = cache_index + jnp.arange(T)
    key_slot_S = jnp.arange(S)
    mask_TxS = key_slot_S[None, :] <= query_slot_T[:, None]
    if start_B is None:
        return mask_TxS[None, None]
    not_pad_BxS = key_slot_S[None, :] >= start_B[:, None]
    return (mask_TxS[None] & not_pad_BxS[:, None, :])[:, None]


def platform() -> str:
    """'tpu', 'nvidia', 'gpu' (other GPUs), or 'cpu': what `auto` decides by (tests monkeypatch it)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    device = jax.devices()[0]
    version = getattr(getattr(device, "client", None), "platform_version", "")
    return "nvidia" if "cuda" in version.lower() or "nvidia" in device.device_kind.lower() else "gpu"


def choose(attention: str, T: int, S: int, K: int, dtype, has_mask: bool) -> str:
    """The path `attend` takes: 'xla', 'blockwise', 'cudnn' or 'splash'."""
    whole_blocks = T == S and T % BLOCK == 0  # no cache, whole kernel blocks
    if attention == "splash":
        # A cache (T != S) or a ragged length falls back to XLA: the kernel's causal mask is static.
        return "splash" if whole_blocks else "xla"
    if attention == "blockwise":
        return "blockwise" if not has_mask and whole_blocks and T > BLOCK else "xla"
    if attention != "auto":
        return attention
    where = platform()
    if where == "tpu" and whole_blocks:
        return "splash"
    if where == "nvidia" and not has_mask and jnp.dtype(dtype) in _CUDNN_DTYPES and K <= 128 and K % 8 == 0:
        return "cudnn"
    if where == "cpu" and not has_mask and whole_blocks and T >= 2 * BLOCK:
        return "blockwise"
    return "xla"


def attend(attention: str, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask) -> jax.Array:
    """Softmax attention; `mask` is None (plain causal) or attention_mask(...)'s Bx1xTxS boolean."""
    T, S, K = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1], q_BxTxHxK.shape[-1]
    path = choose(attention, T, S, K, q_BxTxHxK.dtype, mask is not None)
    if path == "blockwise":
        return blockwise_causal_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK)
    if path == "splash":
        # Without a cache the mask's last query row sees every key that is not left padding.
        not_pad_BxT = None if mask is None else jnp.broadcast_to(mask[:, 0, -1, :], (q_BxTxHxK.shape[0], S))
        return splash_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, not_pad_BxT, interpret=platform() != "tpu")
    if path == "xla" and T == 1 and platform() == "cpu":
        return single_query_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask)
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask, is_causal=mask is None,
                                        implementation="cudnn" if path == "cudnn" else None)


def single_query_attention(q_Bx1xHxK, k_BxSxHxK, v_BxSxHxK, mask):
    """One decoding step as multiply-and-reduce over the cache in its BxSxHxK layout: XLA's CPU dots would
    first copy both caches into BxHxSxK, every layer and step (about 40% of a batch-8 decode step)."""
    K = q_Bx1xHxK.shape[-1]
    logits_BxSxH = jnp.sum(q_Bx1xHxK.astype(jnp.float32) * k_BxSxHxK.astype(jnp.float32), axis=-1) / math.sqrt(K)
    if mask is not None:  # Bx1x1xS (or 1x1x1xS) -> Bx S x1
        logits_BxSxH = jnp.where(mask[:, 0, 0, :, None], logits_BxSxH, jnp.finfo(jnp.float32).min)
    probs_BxSxH = jax.nn.softmax(logits_BxSxH, axis=1)
    out_BxHxK = jnp.sum(probs_BxSxH[..., None] * v_BxSxHxK.astype(jnp.float32), axis=1)
    return out_BxHxK[:, None].astype(v_BxSxHxK.dtype)


def blockwise_causal_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK):
    """Causal attention a query block at a time against only the keys it can see: skips the masked
    scores (a quarter of them at two blocks, nearly half at many) and never holds the full TxT matrix."""
    to_heads = lambda x_BxTxHxK: x_BxTxHxK.transpose(0, 2, 1, 3)  # noqa: E731
    out_BxHxTxK = _blockwise(to_heads(q_BxTxHxK), to_heads(k_BxTxHxK), to_heads(v_BxTxHxK))
    return out_BxHxTxK.transpose(0, 2, 1, 3)


def _blockwise_forward(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK):
    """(out BxHxTxK, each query block's float32 probabilities BxHxCxS, S = the keys that block sees)."""
    T, K = q_BxHxTxK.shape[2], q_BxHxTxK.shape[3]
    outs, probs = [], []
    for start in range(0, T, BLOCK):
        end = start + BLOCK
        logits_BxHxCxS = jnp.einsum("bhck,bhsk->bhcs", q_BxHxTxK[:, :, start:end], k_BxHxTxK[:, :, :end],
                                    preferred_element_type=jnp.float32) * (1 / math.sqrt(K))
        visible_CxS = jnp.arange(end)[None, :] <= (start + jnp.arange(BLOCK))[:, None]
        logits_BxHxCxS = jnp.where(visible_CxS, logits_BxHxCxS, -jnp.inf)  # the diagonal is always visible
        probs_BxHxCxS = jax.nn.softmax(logits_BxHxCxS, axis=-1)
        probs.append(probs_BxHxCxS)
        outs.append(jnp.einsum("bhcs,bhsk->bhck", probs_BxHxCxS.astype(v_BxHxTxK.dtype), v_BxHxTxK[:, :, :end],
                               preferred_element_type=jnp.float32).astype(v_BxHxTxK.dtype))
    return jnp.concatenate(outs, axis=2), probs


@jax.custom_vjp
def _blockwise(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK):
    return _blockwise_forward(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK)[0]


def _blockwise_fwd(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK):
    out_BxHxTxK, probs = _blockwise_forward(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK)
    return out_BxHxTxK, (q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, out_BxHxTxK, probs)


def _blockwise_bwd(residuals, dout_BxHxTxK):
    # The softmax gradient's row sums are rowsum(dout * out): a K-wide reduction instead of an S-wide one.
    q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, out_BxHxTxK, probs = residuals
    T, K, dtype = q_BxHxTxK.shape[2], q_BxHxTxK.shape[3], q_BxHxTxK.dtype
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    delta_BxHxTx1 = jnp.sum(dout_BxHxTxK.astype(jnp.float32) * out_BxHxTxK.astype(jnp.float32), -1, keepdims=True)
    dq_blocks = []
    dk_BxHxTxK = jnp.zeros(k_BxHxTxK.shape, jnp.float32)
    dv_BxHxTxK = jnp.zeros(v_BxHxTxK.shape, jnp.float32)
    for i, start in enumerate(range(0, T, BLOCK)):
        end = start + BLOCK
        probs_BxHxCxS, dout_BxHxCxK = probs[i], dout_BxHxTxK[:, :, start:end]
        dv_BxHxTxK = dv_BxHxTxK.at[:, :, :end].add(f32("bhcs,bhck->bhsk", probs_BxHxCxS.astype(dtype), dout_BxHxCxK))
        dprobs_BxHxCxS = f32("bhck,bhsk->bhcs", dout_BxHxCxK, v_BxHxTxK[:, :, :end])
        dlogits_BxHxCxS = (probs_BxHxCxS * (dprobs_BxHxCxS - delta_BxHxTx1[:, :, start:end])
                           * (1 / math.sqrt(K))).astype(dtype)
        dq_blocks.append(f32("bhcs,bhsk->bhck", dlogits_BxHxCxS, k_BxHxTxK[:, :, :end]))
        dk_BxHxTxK = dk_BxHxTxK.at[:, :, :end].add(f32("bhcs,bhck->bhsk", dlogits_BxHxCxS, q_BxHxTxK[:, :, start:end]))
    return (jnp.concatenate(dq_blocks, axis=2).astype(dtype), dk_BxHxTxK.astype(k_BxHxTxK.dtype),
            dv_BxHxTxK.astype(v_BxHxTxK.dtype))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


@functools.lru_cache(maxsize=16)
def _splash_kernel(T: int, H: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((T, T)) for _ in range(H)])
    with jax.ensure_compile_time_eval():  # the block tables are constants, never tracers of the jit calling us
        return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, not_pad_BxT=None, *, interpret: bool = False):
    """Causal self-attention through the Pallas TPU splash kernel; T must be a multiple of 128.

    Left padding becomes segment ids (padding 0, text 1): text never sees padding, and padding rows see
    earlier padding, so no row is empty. Under a device mesh the kernel runs per shard (shard_map):
    batch and heads split as the activations are, the sequence whole.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, H, K = q_BxTxHxK.shape
    kernel = _splash_kernel(T, H, interpret)
    segment_BxT = jnp.ones((B, T), jnp.int32) if not_pad_BxT is None else not_pad_BxT.astype(jnp.int32)

    def run(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segment_BxT):
        # The kernel takes one example at a time as HxTxK and leaves the 1/sqrt(K) scaling to us.
        def one(q_HxTxK, k_HxTxK, v_HxTxK, segment_T):
            return kernel(q_HxTxK, k_HxTxK, v_HxTxK, segment_ids=SegmentIds(q=segment_T, kv=segment_T))

        q_BxHxTxK = (q_BxTxHxK * (1 / math.sqrt(K))).astype(q_BxTxHxK.dtype).transpose(0, 2, 1, 3)
        out_BxHxTxK = jax.vmap(one)(q_BxHxTxK, k_BxTxHxK.transpose(0, 2, 1, 3), v_BxTxHxK.transpose(0, 2, 1, 3),
                                    segment_BxT)
        return out_BxHxTxK.transpose(0, 2, 1, 3)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segment_BxT)
    # A Pallas call cannot be partitioned by XLA: give each device its own batch rows and heads.
    qkv_spec = nn.logical_to_mesh_axes(("batch", None, "heads", None))
    segment_spec = nn.logical_to_mesh_axes(("batch", None))
    sharded = jax.shard_map(run, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, segment_spec),
                            out_specs=qkv_spec, check_vma=False)
    return sharded(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segment_BxT)
