"""GPU: jax.nn.dot_product_attention's cuDNN flash kernel for the training layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llamavid_jax.ops.attention.blockwise import chunked


def cudnn(q, k, v, kv_valid, q_slots, kv_slots, scale, implementation="cudnn"):
  """The training layout (S = T, query i and key i at slot i, the valid keys a prefix:
  right padding) as cuDNN's own causal and length arguments, so no [S, T] mask exists.
  Other layouts take `chunked`: statically (no causality, a KV cache of T != S slots,
  explicit key slots such as a ring's zig-zag order) or, since slots and padding are
  traced values, by a run-time `lax.cond` on whether this batch has that layout (left
  padding, say). implementation: "xla" runs the same arguments on any backend (tests)."""
  b, s = q.shape[:2]
  fallback = lambda q, k, v: chunked(q, k, v, kv_valid, q_slots, kv_slots, scale)
  if q_slots is None or kv_slots is not None or s != k.shape[1]:
    return fallback(q, k, v)
  lengths = jnp.full((b,), s, jnp.int32) if kv_valid is None else jnp.sum(kv_valid, axis=1, dtype=jnp.int32)
  arange = jnp.arange(s, dtype=jnp.int32)[None]
  layout = jnp.all(q_slots == arange)
  if kv_valid is not None:
    layout &= jnp.all(kv_valid == (arange < lengths[:, None]))
  fused = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
      implementation=implementation)
  return jax.lax.cond(layout, fused, fallback, q, k, v)
