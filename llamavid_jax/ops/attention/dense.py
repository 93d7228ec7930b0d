"""Dense attention on a materialised [S, T] mask: `xla` (short sequences) and the fp32
`reference` every other kernel is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llamavid_jax.ops.attention.masks import NEG, dense_mask


def xla(q, k, v, kv_valid, q_slots, kv_slots, scale):
  # jax.nn.dot_product_attention handles GQA and computes the softmax in fp32.
  mask = dense_mask(kv_valid, q_slots, q.shape[1], k.shape[1], kv_slots)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def reference(q, k, v, kv_valid, q_slots, kv_slots, scale):
  b, s, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, s, kh, h // kh, d).astype(jnp.float32)
  logits = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32)) * scale
  mask = dense_mask(kv_valid, q_slots, s, k.shape[1], kv_slots)
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, NEG)
  w = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    w = jnp.where(mask[:, :, None], w, 0.0)
  out = jnp.einsum("bkgst,btkd->bskgd", w, v.astype(jnp.float32))
  return out.reshape(b, s, h, d).astype(q.dtype)
