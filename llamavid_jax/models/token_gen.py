"""Token generation (paper §3.1): the context token (Eq. 1) and the content token(s).

context = val_proj( mean_M( softmax_N( Q K(X)^T / sqrt(C) ) X ) )   one token per frame
content = mm_projector( pool(X) )                                    1, N*N grid or all
with Q = vlm_att_projector(Q-Former queries) and X the ViT patches without CLS.

`pool` and `mm_projector` are picked by name from the registries `COMPRESSIONS`
(`compress_type`) and `PROJECTORS` (`mm_projector_type`): each entry is the one place
for its token count, its computation, its FLOPs and its names in the release, so a
new variant is one entry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from llamavid_jax.models.layers import dense, gelu


# --- compress_type: a frame's G x G patches -> K content tokens ------------------------
@dataclasses.dataclass(frozen=True)
class Compression:
  """One `compress_type`, spelt "name" or, with `takes_arg`, "name:N"."""
  tokens: Callable[[int, int | None], int]                 # (G, arg) -> K
  pool: Callable[[jax.Array, int | None], jax.Array]       # (float[B, G*G, C], arg) -> float[B, K, C]
  takes_arg: bool = False
  in_release: bool = True    # False: the release's config.json says null (no compression)


def _grid(side: int, g: int) -> tuple[int, int]:
  """"grid:g" on a side x side grid -> (kernel = stride = side // g, output side), as
  torch avg_pool2d (floor mode, no padding)."""
  k = side // g if g else 0
  if g < 2 or k < 1:
    raise ValueError(f"compress_type 'grid:{g}' on a {side}x{side} patch grid")
  return k, (side - k) // k + 1


def _pool_grid(x: jax.Array, g: int) -> jax.Array:
  b, n, c = x.shape
  side = int(round(n**0.5))
  k, out = _grid(side, g)
  x = x.reshape(b, side, side, c)[:, :out * k, :out * k]
  return x.reshape(b, out, k, out, k, c).mean(axis=(2, 4)).reshape(b, out * out, c)


COMPRESSIONS: dict[str, Compression] = {
    "mean": Compression(lambda side, _: 1, lambda x, _: x.mean(axis=1, keepdims=True)),
    "grid": Compression(lambda side, g: _grid(side, g)[1] ** 2, _pool_grid, takes_arg=True),
    "none": Compression(lambda side, _: side * side, lambda x, _: x, in_release=False),
}


def compression(compress_type: str) -> tuple[Compression, int | None]:
  """"grid:4" -> (COMPRESSIONS["grid"], 4), "mean" -> (COMPRESSIONS["mean"], None)."""
  name, colon, arg = compress_type.partition(":")
  c = COMPRESSIONS.get(name)
  if c is None or c.takes_arg != bool(colon) or (colon and not arg.isdigit()):
    names = sorted(n + (":N" if e.takes_arg else "") for n, e in COMPRESSIONS.items())
    raise ValueError(f"compress_type {compress_type!r}: expected one of {names}")
  return c, int(arg) if colon else None


def content_tokens(compress_type: str, grid: int) -> int:
  """Content tokens per frame of a grid x grid patch grid."""
  c, arg = compression(compress_type)
  return c.tokens(grid, arg)


def pool_content(x: jax.Array, compress_type: str) -> jax.Array:
  """x: float[B, N, C] patches (N = G*G) -> float[B, K, C] by `compress_type`:
  "mean" (K=1), "grid:g" (avg pool, kernel = stride = G//g, as torch avg_pool2d), "none"."""
  c, arg = compression(compress_type)
  return c.pool(x, arg)


def compress_to_release(compress_type: str) -> str | None:
  """Our `compress_type` -> the release's config.json value."""
  c, _ = compression(compress_type)
  return compress_type if c.in_release else None


def compress_from_release(value: str | None) -> str:
  """The release's config.json `compress_type` (null = no compression) -> ours."""
  if value is None:
    value = next(n for n, c in COMPRESSIONS.items() if not c.in_release)
  compression(value)
  return value


# --- mm_projector_type: Linear layers with GELU between (LLaVA's mlp{N}x_gelu) ----------
@dataclasses.dataclass(frozen=True)
class ProjectorKind:
  """One `mm_projector_type` (the release's config.json name is the registry key),
  given by the release's torch keys of its Linear layers, in order; ours are fc1, fc2, ..."""
  release_keys: tuple[str, ...]

  @property
  def layers(self) -> tuple[tuple[str, str], ...]:
    """((our layer name, release key), ...)."""
    return tuple((f"fc{i + 1}", k) for i, k in enumerate(self.release_keys))

  def flops_per_token(self, d_in: int, d_out: int) -> int:
    return 2 * (d_in * d_out + (len(self.release_keys) - 1) * d_out * d_out)


PROJECTORS: dict[str, ProjectorKind] = {
    "linear": ProjectorKind(("mm_projector",)),                          # nn.Linear
    "mlp2x_gelu": ProjectorKind(("mm_projector.0", "mm_projector.2")),   # Sequential(Linear, GELU, Linear)
}


def projector(mm_projector_type: str) -> ProjectorKind:
  if mm_projector_type not in PROJECTORS:
    raise ValueError(f"mm_projector_type {mm_projector_type!r}: expected one of {sorted(PROJECTORS)}")
  return PROJECTORS[mm_projector_type]


def torch_std(x) -> float:
  """Init std of a new torch nn.Linear reading x's last axis, 1/sqrt(3 fan_in): the
  release creates these layers after the LLM's own init, so they keep torch's default.
  (A flat 0.02 makes the context attention's q.k start near zero in a small model, and
  training sits on a long plateau before the attention learns to pick an object.)"""
  return 1.0 / math.sqrt(3 * x.shape[-1])


class Projector(nn.Module):
  """`mm_projector`: Linear, then (GELU, Linear) per further layer of its `PROJECTORS` entry."""
  out_dim: int
  kind: str = "mlp2x_gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i, (name, _) in enumerate(projector(self.kind).layers):
      if i:
        x = gelu(x)
      x = dense(self.out_dim, ("mlp" if i else None, "embed"), name=name, std=torch_std(x), **kw)(x)
    return x


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
