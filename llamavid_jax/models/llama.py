"""LLaMA / Vicuna decoder: RMSNorm, RoPE (linear scaling), SwiGLU, grouped-query
attention, and a KV cache for decoding.

The decoder runs on embeddings (so visual tokens can be spliced in first):
`embed(ids)` -> float[B, S, D]; `__call__(x, positions, ...)` -> hidden and cache;
`logits(h)` -> float[B, S, V].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from llamavid_jax.models.config import LlmConfig, check_kv_cache
from llamavid_jax.models.layers import (LAYER_INPUT, Kernel, dense, length_shards, over_sequence_chunks, partitioned,
                                        scan_stack)
from llamavid_jax.ops.attention import attention


class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("embed",)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale * y.astype(self.dtype)).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: float) -> jax.Array:
  """x: float[B, S, H, Dh]; positions: int32[B, S]. HF LLaMA's half-split rotation,
  with linear scaling (positions / scaling)."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)           # [Dh/2]
  ang = (positions.astype(jnp.float32) / scaling)[..., None] * inv_freq            # [B, S, Dh/2]
  cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


# --- the KV cache ------------------------------------------------------------------
KV_ARRAYS = ("k", "v", "k_scale", "v_scale")   # a cache's arrays that are per layer, all [layers, B, T, ...]
_KV_AXES, _SCALE_AXES = ("layers", "batch", "length", "kv_heads", "kv"), ("layers", "batch", "length", "kv_heads")
CACHE_AXES = {"k": _KV_AXES, "v": _KV_AXES, "k_scale": _SCALE_AXES, "v_scale": _SCALE_AXES}   # logical axes


def cache_spec(cfg: LlmConfig, batch: int, max_len: int, dtype, kv_cache: str | None = None
               ) -> dict[str, jax.ShapeDtypeStruct]:
  """The KV cache's arrays (the one statement of its layout): None, k and v of
  dtype[layers, B, max_len, K, Dh]; "int8", k and v of int8[layers, B, max_len, K, Dh]
  with k_scale and v_scale float32[layers, B, max_len, K] (each slot's head is
  int8 x scale, scale = absmax over Dh / 127)."""
  check_kv_cache(kv_cache)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  if kv_cache is None:
    return {n: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for n in ("k", "v")}
  return {"k": jax.ShapeDtypeStruct(shape, jnp.int8), "v": jax.ShapeDtypeStruct(shape, jnp.int8),
          "k_scale": jax.ShapeDtypeStruct(shape[:-1], jnp.float32),
          "v_scale": jax.ShapeDtypeStruct(shape[:-1], jnp.float32)}


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float[B, S, K, Dh] -> (int8[B, S, K, Dh], float32[B, S, K] scale): symmetric
  absmax over Dh (scale = absmax / 127; an all-zero head stores 0 with scale 0)."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)                                             # [B, S, K]
  inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
  q = jnp.clip(jnp.round(x * inv[..., None]), -127, 127).astype(jnp.int8)
  return q, amax / 127.0


def dequantize_kv(q: jax.Array, scale: jax.Array) -> jax.Array:
  """int8[B, T, K, Dh], float32[B, T, K] -> float32[B, T, K, Dh]."""
  return q.astype(jnp.float32) * scale[..., None]


def put_slots(buf: jax.Array, x: jax.Array, index, axis: int = 1) -> jax.Array:
  """x written into buf from slot `index` on along `axis` (the rows on the axis before
  it): index int32[] (every row at one slot; clamped into buf) or int32[B] (each row at
  its own, as the serving engine's rows: one scatter in place, slots past the end
  dropped)."""
  x = x.astype(buf.dtype)
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(buf, x, index, axis=axis)
  rows = jnp.arange(buf.shape[axis - 1])[:, None]                                  # [B, 1]
  slots = index[:, None] + jnp.arange(x.shape[axis])                               # [B, S]
  return buf.at[(slice(None),) * (axis - 1) + (rows, slots)].set(x, mode="drop")


def new_kv(cache: dict, k: jax.Array, v: jax.Array) -> dict:
  """k, v float[B, S, K, Dh] of new positions in the cache's stored format (`cache_spec`
  without the layers and slots: k, v [B, S, K, Dh]; int8 ones with k_scale, v_scale [B, S, K])."""
  if "k_scale" not in cache:
    return {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
  (qk, sk), (qv, sv) = quantize_kv(k), quantize_kv(v)
  return {"k": qk, "k_scale": sk, "v": qv, "v_scale": sv}


def read_cache(cache: dict, layer, new: dict, index, length: int) -> tuple[jax.Array, jax.Array]:
  """The keys and values layer `layer` attends over, [B, length, K, Dh]: its first
  `length` stored slots (`cache`, the whole stack's [layers, B, T, ...], read only) with
  the new positions' (`new_kv`) at slot `index` (`put_slots`), dequantized to float32
  for an int8 cache (the new positions too, so prefill and decode see the same keys).
  A value: the stack writes every layer's new positions after its last layer
  (`Llama.__call__`), so a decode step writes its B slots and copies no cache."""
  def one(n):
    mine = jax.lax.dynamic_index_in_dim(cache[n], layer, 0, keepdims=False)[:, :length]   # [B, length, ...]
    if new[n].shape[1] == 1:   # decode: a select where the slot is the row's own (fuses into the reads)
      at = jnp.arange(mine.shape[1]) == jnp.reshape(index, (-1, 1))                  # [B or 1, T]
      return jnp.where(at.reshape(at.shape + (1,) * (mine.ndim - 2)), new[n].astype(mine.dtype), mine)
    return put_slots(mine, new[n], index)
  if "k_scale" not in cache:
    return one("k"), one("v")
  return dequantize_kv(one("k"), one("k_scale")), dequantize_kv(one("v"), one("v_scale"))


def write_cache(cache: dict, new: dict, index) -> dict:
  """The stack's cache ([layers, B, T, ...]) with every layer's new positions (`new_kv`
  per layer, [layers, B, S, ...]) written at slot `index` (`put_slots`): one write, in
  place where the cache is the caller's to give (a decode step's state)."""
  return {n: put_slots(cache[n], new[n], index, axis=2) for n in cache}


class LlamaBlock(nn.Module):
  cfg: LlmConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  mlp_chunk: int = 0

  @nn.compact
  def __call__(self, x, positions, q_slots, kv_valid, kv_slots, cache, cache_index, layer):
    """x: float[B, S, D]; positions: int32[B, S] (RoPE); q_slots: int32[B, S] each
    query's slot (causal: it sees key slots <= its own); kv_valid: bool[B, T]; kv_slots:
    int32[B, T] each key's slot, or None for its index (a ring's zig-zag order sets it);
    cache: None or the whole stack's KV arrays (`cache_spec`: [layers, B, T', ...]),
    its first T slots read at int32[] `layer` with this layer's new positions at slot
    `cache_index` (`read_cache`; T = S without cache) -> (x, this layer's new
    positions' KV (`new_kv`) or None)."""
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = dict(kw, use_bias=False, std=c.initializer_range)
    x = checkpoint_name(x, LAYER_INPUT)   # what remat_policy "offload_layer_inputs" keeps on the host
    h = RMSNorm(c.rms_eps, name="input_norm", **kw)(x)
    q = dense((c.num_heads, c.head_dim), ("embed", "heads", "kv"), name="q_proj", **proj)(h)
    k = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), name="k_proj", **proj)(h)
    v = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), name="v_proj", **proj)(h)
    q = rope(q, positions, c.rope_theta, c.rope_scaling)
    k = rope(k, positions, c.rope_theta, c.rope_scaling)
    new = None
    if cache is not None:
      new = new_kv(cache, k, v)
      k, v = read_cache(cache, layer, new, cache_index, kv_valid.shape[1])
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    y = attention(q, k.astype(self.dtype), v.astype(self.dtype), kv_valid=kv_valid, q_slots=q_slots,
                  kv_slots=kv_slots, impl=self.attention_impl)
    x = x + dense(c.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj", **proj)(y)
    h = RMSNorm(c.rms_eps, name="post_attention_norm", **kw)(x)
    x = x + self.mlp(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new

  def mlp(self, h):
    """SwiGLU: float[B, S, D] -> float[B, S, D]. Longer than `mlp_chunk` positions (per
    sequence shard), it runs a chunk at a time (`over_sequence_chunks`) on the same
    parameters. Not a library feature: MaxText and friends do not chunk the MLP, but at
    256K positions a chip its [S, mlp] activations are most of a 7B layer's memory."""
    c = self.cfg
    kw = dict(std=c.initializer_range, param_dtype=self.param_dtype)
    # promote_dtype and jnp.dot, not astype and @: Qwix's PTQ (llamavid_jax/quant.py)
    # intercepts them, and the kernels may be its quantized arrays
    wg, wu, wd = nn.dtypes.promote_dtype(
        Kernel((c.d_model, c.mlp_dim), ("embed", "mlp"), name="gate_proj", **kw)(),
        Kernel((c.d_model, c.mlp_dim), ("embed", "mlp"), name="up_proj", **kw)(),
        Kernel((c.mlp_dim, c.d_model), ("mlp", "embed"), name="down_proj", **kw)(), dtype=self.dtype)

    def swiglu(h):   # [B, ..., D] -> [B, ..., D]: [B, S, D], or a chunk [B, shards, chunk, D]
      h = h.astype(self.dtype)
      y = jax.nn.silu(jnp.dot(h, wg)) * jnp.dot(h, wu)
      names = ("batch", "length") + (None,) * (y.ndim - 3) + ("mlp",)
      return jnp.dot(nn.with_logical_constraint(y, names), wd)

    if not (self.mlp_chunk and h.shape[1] > self.mlp_chunk * length_shards(h.shape[1])):
      return swiglu(h)
    return over_sequence_chunks(swiglu, h, self.mlp_chunk)


class Llama(nn.Module):
  cfg: LlmConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat_policy: str = "nothing_saveable"
  mlp_chunk: int = 0
  kv_cache: str | None = None   # stored KV format: None (the compute dtype) or a KV_CACHES name

  def setup(self):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(c.initializer_range)
    self.embed_tokens = nn.Embed(c.vocab_size, c.d_model, **kw, embedding_init=partitioned(init, ("vocab", "embed")))
    self.layers = scan_stack(LlamaBlock, c.num_layers, self.remat_policy, (nn.broadcast,) * 6 + (0,),
                             cfg=c, attention_impl=self.attention_impl, mlp_chunk=self.mlp_chunk, **kw)
    self.norm = RMSNorm(c.rms_eps, **kw)
    if not c.tie_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), use_bias=False, std=c.initializer_range, **kw)

  def embed(self, ids: jax.Array) -> jax.Array:
    """int32[B, S] -> float[B, S, D]; negative ids (placeholders) embed as id 0."""
    return self.embed_tokens(jnp.maximum(ids, 0))

  def __call__(self, x, positions, q_slots, kv_valid, cache=None, cache_index=0, kv_slots=None):
    """x: float[B, S, D]; positions: int32[B, S]; q_slots: int32[B, S]; kv_valid: bool[B, T];
    kv_slots: int32[B, T] or None (`LlamaBlock`);
    cache: None or a dict holding the KV arrays of `cache_spec` ([layers, B, T', ...],
    T' >= T: attention reads the first T slots; other entries are ignored), the new
    positions written at slot `cache_index` (int32[], or int32[B] each row's own) ->
    (final-normed hidden float[B, S, D], the updated KV arrays or None)."""
    x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))
    kv = None if cache is None else {n: cache[n] for n in KV_ARRAYS if n in cache}
    layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
    x, new = self.layers(x, positions, q_slots, kv_valid, kv_slots, kv, cache_index, layers)
    return self.norm(x), (None if kv is None else write_cache(kv, new, cache_index))

  def logits(self, h: jax.Array) -> jax.Array:
    """float[B, S, D] -> float32[B, S, V]."""
    out = self.embed_tokens.attend(h) if self.cfg.tie_embeddings else self.lm_head(h)
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "vocab"))

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    """Zero KV cache (`cache_spec`, in `dtype` or this module's `kv_cache` format),
    constrained to the logical axes CACHE_AXES (under a mesh and rules: batch over data
    / fsdp, slots over sequence, key/value heads over tensor; a no-op without)."""
    spec = cache_spec(self.cfg, batch, max_len, dtype, self.kv_cache)
    return {n: nn.with_logical_constraint(jnp.zeros(a.shape, a.dtype), CACHE_AXES[n]) for n, a in spec.items()}
