"""The instruction-aware Q-Former (InstructBLIP text decoder, BERT-base shaped).

M learned queries are prepended to the instruction's token embeddings; queries and
instruction share bidirectional self-attention (instruction padding masked); only the
query positions cross-attend to the image, in layers 0, f, 2f, ... (f =
cross_attention_freq), and query and text positions use different FFN weights.
Layers are scanned in groups of f (the first of each group cross-attends).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from llamavid_jax.models.config import QFormerConfig
from llamavid_jax.models.layers import dense, gelu, layer_norm, partitioned, scan_stack
from llamavid_jax.ops.attention import attention


class BertAttention(nn.Module):
  """Multi-head attention + output dense + residual post-LayerNorm (BERT)."""
  cfg: QFormerConfig
  kv_width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, kv, kv_valid):
    """x: float[B, Q, D]; kv: float[B, K, Ckv]; kv_valid: bool[B, K] or None -> float[B, Q, D]."""
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, dh, std = c.num_heads, c.hidden // c.num_heads, c.initializer_range
    kv_names = ("embed",) if self.kv_width == c.hidden else (None,)
    q = dense((h, dh), ("embed", "heads", "kv"), name="query", std=std, **kw)(x)
    k = dense((h, dh), kv_names + ("heads", "kv"), name="key", std=std, **kw)(kv)
    v = dense((h, dh), kv_names + ("heads", "kv"), name="value", std=std, **kw)(kv)
    y = attention(q, k, v, kv_valid=kv_valid, impl=self.attention_impl, tower="qformer")          # [B, Q, H, Dh]
    y = dense(c.hidden, ("heads", "kv", "embed"), axis=(-2, -1), name="out", std=std, **kw)(y)
    return layer_norm(c.ln_eps, name="ln", **kw)(y + x)


class BertFFN(nn.Module):
  cfg: QFormerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = gelu(dense(c.mlp_dim, ("embed", "mlp"), name="intermediate", std=c.initializer_range, **kw)(x))
    y = dense(c.hidden, ("mlp", "embed"), name="output", std=c.initializer_range, **kw)(y)
    return layer_norm(c.ln_eps, name="ln", **kw)(y + x)


class QFormerLayer(nn.Module):
  cfg: QFormerConfig
  cross_attention: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, keys_valid, image):
    """x: float[B, M+L, D] (queries first); keys_valid: bool[B, M+L];
    image: float[B, N, Cv] -> float[B, M+L, D]."""
    c = self.cfg
    kw = dict(cfg=c, dtype=self.dtype, param_dtype=self.param_dtype)
    x = BertAttention(kv_width=c.hidden, attention_impl=self.attention_impl, name="attention", **kw)(x, x, keys_valid)
    q, t = x[:, :c.num_query], x[:, c.num_query:]
    if self.cross_attention:
      q = BertAttention(kv_width=c.vision_width, attention_impl=self.attention_impl,
                        name="crossattention", **kw)(q, image, None)
    q = BertFFN(name="ffn_query", **kw)(q)
    t = BertFFN(name="ffn", **kw)(t)
    return jnp.concatenate([q, t], axis=1)


class QFormerGroup(nn.Module):
  """cross_attention_freq consecutive layers; the first one cross-attends."""
  cfg: QFormerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, keys_valid, image):
    for i in range(self.cfg.cross_attention_freq):
      x = QFormerLayer(self.cfg, cross_attention=(i == 0), dtype=self.dtype, param_dtype=self.param_dtype,
                       attention_impl=self.attention_impl, name=f"layer_{i}")(x, keys_valid, image)
    return x, None


class QFormer(nn.Module):
  cfg: QFormerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat_policy: str = "nothing_saveable"

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, image: jax.Array) -> jax.Array:
    """ids: int32[B, L] instruction; mask: bool[B, L]; image: float[B, N+1, Cv] ViT
    features with CLS -> float[B, M, D], the query positions of the last layer."""
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if c.num_layers % c.cross_attention_freq:
      raise ValueError(f"Q-Former: {c.num_layers} layers are not groups of {c.cross_attention_freq}")
    b, l = ids.shape
    image = layer_norm(c.vision_ln_eps, name="vision_ln", **kw)(image)   # vlm_att_ln
    init = nn.initializers.normal(c.initializer_range)
    queries = self.param("query_tokens", partitioned(init, (None, None, "embed")),
                         (1, c.num_query, c.hidden), self.param_dtype)
    words = nn.Embed(c.vocab_size, c.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="word_embeddings",
                     embedding_init=partitioned(init, ("vocab", "embed")))(ids)
    pos = self.param("position_embeddings", partitioned(init, (None, "embed")),
                     (c.max_positions, c.hidden), self.param_dtype)
    text = words + pos[None, :l]            # text positions start at 0; queries have none
    x = jnp.concatenate([jnp.broadcast_to(queries, (b,) + queries.shape[1:]).astype(text.dtype), text], 1)
    x = layer_norm(c.ln_eps, name="embed_ln", **kw)(x)                   # [B, M+L, D]
    keys_valid = jnp.concatenate([jnp.ones((b, c.num_query), bool), mask.astype(bool)], 1)
    x, _ = scan_stack(QFormerGroup, c.num_layers // c.cross_attention_freq, self.remat_policy,
                      (nn.broadcast,) * 2, "layers", cfg=c, attention_impl=self.attention_impl,
                      **kw)(x, keys_valid, image)
    return x[:, :c.num_query]
