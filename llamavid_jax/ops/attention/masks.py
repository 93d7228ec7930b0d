"""The structured attention mask: key validity and causal slots, never a dense input.

  kv_valid bool[B, T]   keys that exist (padding is False), or None
  q_slots  int32[B, S]  causal: query i sees the keys whose slot is <= q_slots[i]; None =
                        no causality
  kv_slots int32[B, T]  each key's slot; None = its index (arange(T)). A ring in the
                        zig-zag layout passes its order here (`parallel.ring_order`)
"""

from __future__ import annotations

import jax.numpy as jnp

NEG = -1e30   # finite "minus infinity": fully masked rows stay NaN-free


def key_slots(kv_slots, b: int, t: int):
  """int32[B, T]: kv_slots, or each key's index where None."""
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if kv_slots is None else kv_slots.astype(jnp.int32)


def dense_mask(kv_valid, q_slots, s: int, t: int, kv_slots=None):
  """bool[B, 1, S, T] (or None) from the structured mask."""
  mask = None if kv_valid is None else kv_valid[:, None, None, :]
  if q_slots is not None:
    causal = key_slots(kv_slots, q_slots.shape[0], t)[:, None, None, :] <= q_slots[:, None, :, None]
    mask = causal if mask is None else mask & causal
  return mask


def block_mask(q_slots, k_slots, k_valid):
  """q_slots int32[b, s]; k_slots int32[b, blk], k_valid bool[b, blk] (one key block)
  -> bool[b, 1, 1, s, blk]."""
  return k_valid[:, None, None, None, :] & (k_slots[:, None, None, None, :] <= q_slots[:, None, None, :, None])
