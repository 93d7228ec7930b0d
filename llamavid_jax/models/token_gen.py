"""Token generation (paper §3.1): the context token (Eq. 1) and the content token(s).

context = val_proj( mean_M( softmax_N( Q K(X)^T / sqrt(C) ) X ) )   one token per frame
content = mm_projector( pool(X) )                                    1, N*N grid or all
with Q = vlm_att_projector(Q-Former queries) and X the ViT patches without CLS.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from llamavid_jax.models.layers import dense, gelu


def pool_content(x: jax.Array, compress_type: str) -> jax.Array:
  """x: float[B, N, C] patches (N = G*G) -> float[B, K, C] by `compress_type`:
  "mean" (K=1), "grid:g" (avg pool, kernel = stride = G//g, as torch avg_pool2d), "none"."""
  if compress_type == "none":
    return x
  if compress_type == "mean":
    return x.mean(axis=1, keepdims=True)
  if compress_type.startswith("grid:"):
    g = int(compress_type.split(":")[1])
    b, n, c = x.shape
    side = int(round(n**0.5))
    k = side // g
    if g < 2 or k < 1:
      raise ValueError(f"compress_type {compress_type!r} on a {side}x{side} patch grid")
    out = (side - k) // k + 1                       # torch floor mode, no padding
    x = x.reshape(b, side, side, c)[:, :out * k, :out * k]
    return x.reshape(b, out, k, out, k, c).mean(axis=(2, 4)).reshape(b, out * out, c)
  raise ValueError(f"compress_type {compress_type!r}: expected 'mean', 'grid:N' or 'none'")


def torch_std(x) -> float:
  """Init std of a new torch nn.Linear reading x's last axis, 1/sqrt(3 fan_in): the
  release creates these layers after the LLM's own init, so they keep torch's default.
  (A flat 0.02 makes the context attention's q.k start near zero in a small model, and
  training sits on a long plateau before the attention learns to pick an object.)"""
  return 1.0 / math.sqrt(3 * x.shape[-1])


class Projector(nn.Module):
  """`mm_projector`: "linear" or "mlp2x_gelu" (Linear, GELU, Linear)."""
  out_dim: int
  kind: str = "mlp2x_gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "linear":
      return dense(self.out_dim, (None, "embed"), name="fc1", std=torch_std(x), **kw)(x)
    if self.kind == "mlp2x_gelu":
      x = gelu(dense(self.out_dim, (None, "embed"), name="fc1", std=torch_std(x), **kw)(x))
      return dense(self.out_dim, ("mlp", "embed"), name="fc2", std=torch_std(x), **kw)(x)
    raise ValueError(f"mm_projector_type {self.kind!r}: expected 'linear' or 'mlp2x_gelu'")


class TokenGenerator(nn.Module):
  llm_dim: int
  compress_type: str = "mean"
  projector: str = "mlp2x_gelu"
  use_context: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array | None, patches: jax.Array):
    """queries: float[B, P, T, M, Dq] Q-Former outputs, one set per prompt P (None
    without context token); patches: float[B, T, N, C] ViT patches (no CLS) ->
    (float[B, P, T, tokens_per_frame, d_llm], context first; float32[B, P, T, M, N]
    context-attention weights or None). K(X) and the content tokens do not depend on
    the prompt and are computed once per frame."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, n, c = patches.shape
    content = pool_content(patches.reshape(b * t, n, c), self.compress_type)        # [B*T, K, C]
    content = Projector(self.llm_dim, self.projector, name="mm_projector", **kw)(content)
    content = content.reshape(b, 1, t, -1, self.llm_dim)                            # [B, 1, T, K, D]
    if not self.use_context:
      return content, None
    p = queries.shape[1]
    q = dense(c, (None, "embed"), name="vlm_att_projector", std=torch_std(queries),
              **kw)(queries)                                                        # [B, P, T, M, C]
    k = dense(c, (None, "embed"), name="vlm_att_key_projector", std=torch_std(patches),
              **kw)(patches)                                                        # [B, T, N, C]
    scores = jnp.einsum("bptmc,btnc->bptmn", q, k) / jnp.sqrt(jnp.float32(c)).astype(q.dtype)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)                  # [B, P, T, M, N]
    ctx = jnp.einsum("bptmn,btnc->bptc", weights.astype(patches.dtype), patches) / weights.shape[3]
    ctx = dense(self.llm_dim, (None, "embed"), name="vlm_att_val_projector", std=torch_std(ctx),
                **kw)(ctx)                                                          # [B, P, T, D]
    content = jnp.broadcast_to(content, (b, p) + content.shape[2:])
    return jnp.concatenate([ctx[:, :, :, None].astype(content.dtype), content], axis=3), weights
