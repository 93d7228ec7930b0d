"""The one attention entry point of every model.

Modules call `attention(q, k, v, mask=..., impl=cfg.attention_impl)`; the
implementation is picked by name from `IMPLS`, so memory-efficient or
sequence-sharded (ring) kernels are added here without touching any model.

Shapes: q float[B, S, H, Dh]; k, v float[B, T, K, Dh] with H % K == 0 (grouped-query
attention); mask bool[B, 1 | H, S, T] (True = attend) or None.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _xla(q, k, v, mask, scale):
  # jax.nn.dot_product_attention handles GQA and computes the softmax in fp32.
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def _cudnn(q, k, v, mask, scale):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")


def _reference(q, k, v, mask, scale):
  """Plain einsum attention in fp32: the numerical reference for the kernels."""
  b, s, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, s, kh, h // kh, d).astype(jnp.float32)
  logits = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32)) * scale
  if mask is not None:
    m = jnp.broadcast_to(mask, (b, h, s, mask.shape[-1])).reshape(b, kh, h // kh, s, -1)
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  w = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgst,btkd->bskgd", w, v.astype(jnp.float32))
  return out.reshape(b, s, h, d).astype(q.dtype)


IMPLS: dict[str, Callable] = {"xla": _xla, "cudnn": _cudnn, "reference": _reference}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              impl: str = "xla", scale: float | None = None) -> jax.Array:
  """Scaled dot-product attention -> float[B, S, H, Dh]."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl {impl!r}: expected one of {sorted(IMPLS)}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return IMPLS[impl](q, k, v, mask, scale)
