"""EVA-ViT-g, the frozen visual encoder (LAVIS `eva_vit_g.pth` layout).

Pre-LN blocks; attention has one `qkv` weight without bias plus separate `q_bias` and
`v_bias` (the key bias is zero). The output is the last block's output with no final
norm: float[B, 1 + G*G, D] (CLS first).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llamavid_jax.models.config import VisionConfig
from llamavid_jax.models.layers import dense, gelu, layer_norm, partitioned, scan_stack
from llamavid_jax.ops.attention import attention


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float64[n_out, n_in]: torch's bicubic resize (align_corners=False, A=-0.75,
  border-clamped taps) as a matrix, so a 2-D resize is `W @ X @ W.T`."""
  a = -0.75

  def cubic(t):  # Keys kernel weights for taps at offsets -1, 0, 1, 2
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return (w0, w1, w2, 1 - w0 - w1 - w2)

  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = (i + 0.5) * n_in / n_out - 0.5   # no clamp of src for cubic (torch)
    i0 = int(np.floor(src))
    for off, w in zip((-1, 0, 1, 2), cubic(src - i0)):
      m[i, min(max(i0 + off, 0), n_in - 1)] += w
  return m


def interpolate_pos_embed(pos: jax.Array, grid_out: int) -> jax.Array:
  """float[1, 1 + g*g, D] -> float[1, 1 + grid_out**2, D]; CLS position kept,
  patch positions resized bicubically exactly as the release (and torch) do."""
  g = int(round((pos.shape[1] - 1) ** 0.5))
  if g == grid_out:
    return pos
  w = jnp.asarray(bicubic_matrix(g, grid_out), jnp.float32)
  patches = pos[0, 1:].reshape(g, g, -1).astype(jnp.float32)
  patches = jnp.einsum("ih,hwd,jw->ijd", w, patches, w, precision="highest")
  return jnp.concatenate([pos[:, :1], patches.reshape(1, grid_out**2, -1).astype(pos.dtype)], 1)


class VitBlock(nn.Module):
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, _=None):
    """x: float[B, N, D] -> (float[B, N, D], None)."""
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, dh = c.num_heads, c.width // c.num_heads
    y = layer_norm(c.ln_eps, name="norm1", **kw)(x)
    qkv = dense((3, h, dh), ("embed", None, "heads", "kv"), use_bias=False, name="qkv", **kw)(y)
    q_bias = self.param("q_bias", partitioned(nn.initializers.zeros_init(), ("heads", "kv")), (h, dh), self.param_dtype)
    v_bias = self.param("v_bias", partitioned(nn.initializers.zeros_init(), ("heads", "kv")), (h, dh), self.param_dtype)
    q, k, v = qkv[:, :, 0] + q_bias, qkv[:, :, 1], qkv[:, :, 2] + v_bias  # [B, N, H, Dh]
    y = attention(q.astype(self.dtype), k, v.astype(self.dtype), impl=self.attention_impl, tower="vit")
    x = x + dense(c.width, ("heads", "kv", "embed"), axis=(-2, -1), name="proj", **kw)(y)
    y = layer_norm(c.ln_eps, name="norm2", **kw)(x)
    y = gelu(dense(c.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(y))
    x = x + dense(c.width, ("mlp", "embed"), name="fc2", **kw)(y)
    x = nn.with_logical_constraint(x, ("batch", None, "embed"))
    return x, None


class EvaViT(nn.Module):
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat_policy: str = "nothing_saveable"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images: float[B, H, W, 3] (CLIP-normalised) -> float[B, 1 + (H/p)*(W/p), D]."""
    c = self.cfg
    if images.shape[1] != images.shape[2] or images.shape[1] % c.patch_size:
      raise ValueError(f"images {images.shape}: expected square inputs, a multiple of {c.patch_size}")
    x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed",
                kernel_init=partitioned(nn.initializers.normal(0.02), (None, None, None, "embed")),
                bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)))(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)                                   # [B, G*G, D]
    cls = self.param("cls_token", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1, d), self.param_dtype)
    g0 = c.pos_embed_grid or c.grid
    pos = self.param("pos_embed", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, g0 * g0 + 1, d), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
    x = x + interpolate_pos_embed(pos, gh).astype(x.dtype)         # [B, N+1, D]
    x = nn.with_logical_constraint(x, ("batch", None, "embed"))
    x, _ = scan_stack(VitBlock, c.depth, self.remat_policy, (nn.broadcast,), "blocks", cfg=c,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      attention_impl=self.attention_impl)(x, None)
    return x
