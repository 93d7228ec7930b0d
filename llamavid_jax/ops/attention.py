"""The one attention entry point of every model.

Modules call `attention(q, k, v, kv_valid=..., q_slots=..., impl=cfg.attention_impl)`;
the implementation is picked by name from `IMPLS`, so kernels are added here without
touching any model.

Shapes: q float[B, S, H, Dh]; k, v float[B, T, K, Dh] with H % K == 0 (grouped-query
attention). The mask is structured, never a dense [S, T] input, so that blockwise and
sequence-sharded kernels can build it per block:
  kv_valid bool[B, T]   keys that exist (padding is False), or None
  q_slots  int32[B, S]  causal: query i sees the keys whose slot is <= q_slots[i]; None =
                        no causality
  kv_slots int32[B, T]  each key's slot; None = its index (arange(T)). Training on a ring
                        passes its zig-zag order here (`ring_order`). Any order is
                        correct; the blockwise kernels skip exactly the masked work when
                        the slots are non-decreasing within each device's chunk (both
                        layouts are)

Implementations:
  xla         jax.nn.dot_product_attention on a dense mask (short sequences)
  cudnn       GPU: jax.nn.dot_product_attention's cuDNN flash kernel, causal and padding
              as `is_causal` and sequence lengths (no mask array), for the training layout
              (q_slots = key slots = arange(S), right padding); otherwise `chunked`
  reference   plain fp32 einsum (the numerical reference)
  chunked     blockwise online softmax over key blocks, O(S * block) memory, flash-style
              recomputing backward (custom_vjp); pure JAX on any backend
  ring        `chunked` sequence-sharded over the mesh axis `sequence` (ring attention,
              Liu et al. 2023): each device keeps its query chunk while key/value chunks
              travel around the ring; the backward pass sends dK/dV around with them.
              A step whose chunk is wholly in the future does no work, and the model lays
              the sequence out zig-zag once (`ring_order`: device d holds chunks d and
              2n-1-d of 2n), so every device does the same number of blocks.
  splash      TPU only: Pallas splash attention (jax.experimental.pallas.ops.tpu), causal
              self-attention of training (query i at slot i, S = T in whole blocks;
              padding by segment ids), shard_mapped over batch and heads. With the
              sequence split over `sequence`, a ring of splash steps in the zig-zag
              layout (`_splash_ring`: one static-mask kernel a step, no masked block).
  auto        per backend: splash on TPU, cudnn on GPU, chunked on CPU; a sequence split
              over `sequence` takes the splash ring on TPU, `ring` elsewhere.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

NEG = -1e30   # finite "minus infinity": fully masked rows stay NaN-free


def _key_slots(kv_slots, b: int, t: int):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if kv_slots is None else kv_slots.astype(jnp.int32)


def dense_mask(kv_valid, q_slots, s: int, t: int, kv_slots=None):
  """bool[B, 1, S, T] (or None) from the structured mask."""
  mask = None if kv_valid is None else kv_valid[:, None, None, :]
  if q_slots is not None:
    causal = _key_slots(kv_slots, q_slots.shape[0], t)[:, None, None, :] <= q_slots[:, None, :, None]
    mask = causal if mask is None else mask & causal
  return mask


def _xla(q, k, v, kv_valid, q_slots, kv_slots, scale):
  # jax.nn.dot_product_attention handles GQA and computes the softmax in fp32.
  mask = dense_mask(kv_valid, q_slots, q.shape[1], k.shape[1], kv_slots)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def _cudnn(q, k, v, kv_valid, q_slots, kv_slots, scale, implementation="cudnn"):
  """The training layout (S = T, query i and key i at slot i, the valid keys a prefix:
  right padding) as cuDNN's own causal and length arguments, so no [S, T] mask exists.
  Other layouts take `chunked`: statically (no causality, a KV cache of T != S slots,
  explicit key slots such as a ring's zig-zag order) or, since slots and padding are
  traced values, by a run-time `lax.cond` on whether this batch has that layout (left
  padding, say). implementation: "xla" runs the same arguments on any backend (tests)."""
  b, s = q.shape[:2]
  fallback = lambda q, k, v: _chunked(q, k, v, kv_valid, q_slots, kv_slots, scale)
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


def _reference(q, k, v, kv_valid, q_slots, kv_slots, scale):
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


# --- blockwise kernel shared by `chunked` and `ring` ----------------------------------
# Layout inside: q float32[b, s, K, G, d] (pre-scaled), k/v float32[b, t, K, d];
# statistics m, l float32[b, K, G, s]; accumulators as q.


def _block_mask(q_slots, k_slots, k_valid):
  """q_slots int32[b, s]; k_slots int32[b, blk], k_valid bool[b, blk] (one key block)
  -> bool[b, 1, 1, s, blk]."""
  return k_valid[:, None, None, None, :] & (k_slots[:, None, None, None, :] <= q_slots[:, None, None, :, None])


def _loop(n, body, carry):
  """carry = body(i, carry) for i = 0 .. n - 1 (n may be traced).

  A `while_loop`, not a `scan`: these loops run inside the custom VJP, which is never
  differentiated, but under an outer `scan` (the scanned layers) JAX still partially
  evaluates an inner `scan` and stacks the block masks it can compute early as
  residuals: an [S, T] buffer (S^2 memory: 16 GiB of masks at 64K for 4 heads). A
  while loop has no stacked outputs to hoist into, and its trip count can depend on
  the data: the causal skip below."""
  return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])), (jnp.int32(0), carry))[1]


def _tile(x, i, size, axis=1):
  """The i-th `size` slice of x along `axis`."""
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _put(x, y, i, size, axis=1):
  return jax.lax.dynamic_update_slice_in_dim(x, y, i * size, axis=axis)


def visible_blocks(max_q_slot, k_slots, block: int):
  """How many leading key blocks of a chunk (k_slots int[b, t], t in whole blocks) a
  query tile whose largest slot is `max_q_slot` must compute: up to its last block
  holding a key at or before that slot. The rest hold only keys no query of the tile
  may attend to (causal), so they are never computed; with slots non-decreasing in the
  chunk, every block before the last visible one is visible too, so the work is exact."""
  first = k_slots.reshape(k_slots.shape[0], -1, block).min(axis=(0, 2))               # [n_blocks]
  return jnp.max(jnp.where(first <= max_q_slot, jnp.arange(1, first.shape[0] + 1, dtype=jnp.int32), 0))


def _fwd_chunk(q, k, v, q_slots, k_slots, k_valid, carry, block, scale):
  """Folds one key/value chunk (its keys' slots k_slots int32[b, t]) into the online-softmax
  state (o, m, l), one query tile of `block` rows at a time, over the key blocks
  that tile can see. q, k, v stay in their dtype; each tile is cast to float32 (and
  q scaled) as it is used, so no float32 copy of a whole chunk exists."""
  qb = min(block, q.shape[1])

  def tile(j, carry):
    o, m, l = carry
    qj, sj = _tile(q, j, qb).astype(jnp.float32) * scale, _tile(q_slots, j, qb)

    def body(i, c):
      oj, mj, lj = c
      s = jnp.einsum("bqkgd,btkd->bkgqt", qj, _tile(k, i, block).astype(jnp.float32))
      mask = _block_mask(sj, _tile(k_slots, i, block), _tile(k_valid, i, block))
      s = jnp.where(mask, s, NEG)
      m_new = jnp.maximum(mj, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(mj - m_new)
      lj = lj * corr + p.sum(-1)
      oj = oj * jnp.moveaxis(corr, -1, 1)[..., None] + jnp.einsum("bkgqt,btkd->bqkgd", p, _tile(v, i, block).astype(jnp.float32))
      return oj, m_new, lj

    n = visible_blocks(jnp.max(sj), k_slots, block)
    oj, mj, lj = _loop(n, body, (_tile(o, j, qb), _tile(m, j, qb, 3), _tile(l, j, qb, 3)))
    return _put(o, oj, j, qb), _put(m, mj, j, qb, 3), _put(l, lj, j, qb, 3)

  return _loop(q.shape[1] // qb, tile, carry)


def _bwd_chunk(q, k, v, q_slots, k_slots, k_valid, do, lse, delta, block, scale, carry):
  """Adds one key/value chunk's gradients to carry = (dq, dk, dv) (float32; dk, dv
  those of this chunk), flash-attention-2 style, over the same (query tile, visible
  key block) pairs as the forward; tiles cast to float32 as they are used."""
  qb = min(block, q.shape[1])

  def tile(j, carry):
    dq, dk, dv = carry
    qj, sj = _tile(q, j, qb).astype(jnp.float32) * scale, _tile(q_slots, j, qb)
    doj = _tile(do, j, qb).astype(jnp.float32)
    lse_j, delta_j = _tile(lse, j, qb, 3), _tile(delta, j, qb, 3)

    def body(i, c):
      dqj, dk, dv = c
      kb, vb = _tile(k, i, block).astype(jnp.float32), _tile(v, i, block).astype(jnp.float32)
      s = jnp.einsum("bqkgd,btkd->bkgqt", qj, kb)
      mask = _block_mask(sj, _tile(k_slots, i, block), _tile(k_valid, i, block))
      p = jnp.where(mask, jnp.exp(s - lse_j[..., None]), 0.0)            # [b, K, G, qb, blk]
      ds = p * (jnp.einsum("bqkgd,btkd->bkgqt", doj, vb) - delta_j[..., None])
      dqj = dqj + jnp.einsum("bkgqt,btkd->bqkgd", ds, kb)
      dk = _put(dk, _tile(dk, i, block) + jnp.einsum("bkgqt,bqkgd->btkd", ds, qj), i, block)
      dv = _put(dv, _tile(dv, i, block) + jnp.einsum("bkgqt,bqkgd->btkd", p, doj), i, block)
      return dqj, dk, dv

    n = visible_blocks(jnp.max(sj), k_slots, block)
    dqj, dk, dv = _loop(n, body, (_tile(dq, j, qb), dk, dv))
    return _put(dq, dqj, j, qb), dk, dv

  return _loop(q.shape[1] // qb, tile, carry)


def ring_shift(xs, axis, step: int = 1):
  """Inside a shard_map: every device's xs (any pytree) sent to device i + step (mod n)
  of `axis` (a name or a tuple of names; None: unchanged). step 1 is the ring's turn."""
  if axis is None:
    return xs
  n = jax.lax.axis_size(axis)
  return jax.lax.ppermute(xs, axis, [(i, (i + step) % n) for i in range(n)])


def _local_fwd(q, k, v, q_slots, kv_valid, kv_slots, *, scale, axis, block):
  """Per-device forward. q: [b, s, H, d] (the local query chunk); k, v, kv_valid,
  kv_slots: the local key chunk. Returns (o float32[b, s, K, G, d], lse float32[b, K, G, s])."""
  b, s, h, d = q.shape
  kh = k.shape[2]
  n = 1 if axis is None else jax.lax.axis_size(axis)
  qg = q.reshape(b, s, kh, h // kh, d)
  o = jnp.zeros(qg.shape, jnp.float32)
  m = jnp.full((b, kh, h // kh, s), NEG, jnp.float32)
  l = jnp.zeros_like(m)
  kv = (k, v, kv_slots, kv_valid)   # travel in their dtype (bf16: half the ring's traffic)

  def step(i, carry):   # a loop, not n unrolled steps: XLA keeps one step's buffers, not n in flight
    (o, m, l), kv = carry
    oml = _fwd_chunk(qg, kv[0], kv[1], q_slots, kv[2], kv[3], (o, m, l), block, scale)   # no work where the chunk is all in the future
    return oml, ring_shift(kv, axis)

  (o, m, l), kv = _loop(n - 1, step, ((o, m, l), kv))
  o, m, l = _fwd_chunk(qg, kv[0], kv[1], q_slots, kv[2], kv[3], (o, m, l), block, scale)
  safe_l = jnp.where(l > 0, l, 1.0)
  o = o / jnp.moveaxis(safe_l, -1, 1)[..., None]
  return o, m + jnp.log(safe_l)


def _local_bwd(q, k, v, q_slots, kv_valid, kv_slots, o, lse, do, *, scale, axis, block):
  b, s, h, d = q.shape
  kh = k.shape[2]
  n = 1 if axis is None else jax.lax.axis_size(axis)
  qg = q.reshape(b, s, kh, h // kh, d)
  do = do.reshape(qg.shape)
  delta = jnp.moveaxis(jnp.sum(do.astype(jnp.float32) * o, -1), 1, -1)   # [b, K, G, s]
  dq = jnp.zeros(qg.shape, jnp.float32)
  travel = (k, v, kv_slots, kv_valid, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))

  def step(i, carry):
    dq, (kc, vc, slots, valid, dk, dv) = carry
    dq, dk, dv = _bwd_chunk(qg, kc, vc, q_slots, slots, valid, do, lse, delta, block, scale, (dq, dk, dv))
    return dq, ring_shift((kc, vc, slots, valid, dk, dv), axis)   # n shifts: dK/dV come home

  dq, travel = _loop(n, step, (dq, travel))
  dk, dv = travel[4], travel[5]
  return (dq * scale).reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _specs(q, k, mesh, axis):
  """PartitionSpecs of q/k/v, kv_valid and q_slots from the active logical rules."""
  from llamavid_jax import sharding   # leaf module; imported late to keep ops standalone
  rules = nn.get_logical_axis_rules() or sharding.LOGICAL_RULES
  qs = sharding.fit_spec(sharding.logical_to_spec(("batch", "length", "heads", "kv"), rules), q.shape, mesh)
  ks = sharding.fit_spec(sharding.logical_to_spec(("batch", "length", "kv_heads", "kv"), rules), k.shape, mesh)
  if qs[1] != axis or ks[1] != axis:
    raise ValueError(f"ring attention: the sequence must be sharded over {axis!r}, got {qs} / {ks}")
  if qs[2] != ks[2]:   # q heads reshape to (K, G) locally: shard both or neither
    qs, ks = P(*qs[:2], None, None), P(*ks[:2], None, None)
  return qs, ks, P(qs[0], qs[1]), P(ks[0], ks[1])


def sharding_axis(q, k, mesh):
  """The mesh axes the active rules put the query sequence on (None: whole)."""
  from llamavid_jax import sharding
  rules = nn.get_logical_axis_rules() or sharding.LOGICAL_RULES
  return sharding.fit_spec(sharding.logical_to_spec(("batch", "length", "heads", "kv"), rules), q.shape, mesh)[1]


def _current_mesh():
  """The mesh of the enclosing `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _blockwise(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh):
  return _blockwise_fwd(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh)[0]


def _blockwise_fwd(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh):
  fwd = functools.partial(_local_fwd, scale=scale, axis=axis, block=block)
  if axis is not None:
    qs, ks, qsl, kvl = _specs(q, k, mesh, axis)
    stat = P(qs[0], qs[2], None, qs[1])
    fwd = jax.shard_map(fwd, mesh=mesh, in_specs=(qs, ks, ks, qsl, kvl, kvl),
                        out_specs=(P(*qs[:3], None, None), stat), check_vma=False)
  o, lse = fwd(q, k, v, q_slots, kv_valid, kv_slots)
  out = o.reshape(q.shape).astype(q.dtype)
  return out, (q, k, v, kv_valid, q_slots, kv_slots, o, lse)


def _blockwise_bwd(scale, axis, block, mesh, res, g):
  q, k, v, kv_valid, q_slots, kv_slots, o, lse = res
  bwd = functools.partial(_local_bwd, scale=scale, axis=axis, block=block)
  if axis is not None:
    qs, ks, qsl, kvl = _specs(q, k, mesh, axis)
    stat = P(qs[0], qs[2], None, qs[1])
    bwd = jax.shard_map(bwd, mesh=mesh, in_specs=(qs, ks, ks, qsl, kvl, kvl, P(*qs[:3], None, None), stat, qs),
                        out_specs=(qs, ks, ks), check_vma=False)
  dq, dk, dv = bwd(q, k, v, q_slots, kv_valid, kv_slots, o, lse, g)
  return dq, dk, dv, None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)

BLOCK = 512   # keys per inner block of `chunked` / `ring`


def _prepare(q, k, kv_valid, q_slots, kv_slots, block):
  b, s, t = q.shape[0], q.shape[1], k.shape[1]
  kv_valid = jnp.ones((b, t), bool) if kv_valid is None else kv_valid
  causal = q_slots is not None
  q_slots = q_slots if causal else jnp.full((b, s), jnp.iinfo(jnp.int32).max, jnp.int32)   # sees every slot
  return kv_valid, q_slots.astype(jnp.int32), _key_slots(kv_slots, b, t), min(block, t)


def _chunked(q, k, v, kv_valid, q_slots, kv_slots, scale, block=BLOCK):
  kv_valid, q_slots, kv_slots, block = _prepare(q, k, kv_valid, q_slots, kv_slots, block)
  pad = -k.shape[1] % block          # pad keys to whole blocks; padded keys are invalid
  if pad:
    k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
    kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad)))
    kv_slots = jnp.pad(kv_slots, ((0, 0), (0, pad)), mode="edge")   # keeps the slots non-decreasing
  s = q.shape[1]
  pad = -s % block if s > block else 0   # queries in whole tiles; padded ones see no key
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_slots = jnp.pad(q_slots, ((0, 0), (0, pad)), constant_values=-1)
  return _blockwise(q, k, v, kv_valid, q_slots, kv_slots, scale, None, block, None)[:, :s]


def _ring(q, k, v, kv_valid, q_slots, kv_slots, scale, block=BLOCK, axis="sequence"):
  mesh = _current_mesh()
  if mesh is None or mesh.shape.get(axis, 1) == 1:
    return _chunked(q, k, v, kv_valid, q_slots, kv_slots, scale, block)
  kv_valid, q_slots, kv_slots, _ = _prepare(q, k, kv_valid, q_slots, kv_slots, block)
  local_t = k.shape[1] // mesh.shape[axis]
  block = min(block, max(local_t // 2, 1))   # a zig-zag chunk is two halves: no block straddles them
  if k.shape[1] % (mesh.shape[axis] * block):
    raise ValueError(f"ring attention: {k.shape[1]} keys do not split into {mesh.shape[axis]} chunks of blocks of {block}")
  return _blockwise(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh)


# --- the ring's load-balanced layout -------------------------------------------------
# Causal attention over n contiguous chunks gives device d work for d + 1 chunks: the
# last device does n times the first's. Zig-zag (the layout of Megatron-LM's context
# parallelism and of the zigzag ring flash attention) cuts the sequence into 2n chunks and gives device d
# chunks d and 2n-1-d: every device then computes the same number of blocks. The model
# applies it once, to the LLM input with its positions, slots and padding (and the loss
# to its targets), not per layer; attention sees the order through `kv_slots`.

RING_IMPLS = ("ring", "splash", "auto")   # the impls that run as a ring where `sequence` splits the length


def ring_shards(impl: str) -> int:
  """The number of ring devices `impl` splits the sequence over under the current mesh
  (1: no ring)."""
  mesh = _current_mesh()
  if impl not in RING_IMPLS or mesh is None:
    return 1
  return mesh.shape.get("sequence", 1)


def zigzag(x, n: int, axis: int = 1, inverse: bool = False):
  """x with `axis` (length L, a multiple of 2n) in zig-zag order: position p of device d
  (L / n each) comes from chunk d or 2n-1-d of 2n. A reshape, a reverse and a concat
  (collective permutes under sharding, never a gather of the whole axis). inverse=True
  restores the natural order."""
  x = jnp.moveaxis(x, axis, 0)
  length = x.shape[0]
  if length % (2 * n):
    raise ValueError(f"zig-zag ring layout: length {length} is not a multiple of 2 x {n} shards")
  c = length // (2 * n)
  if not inverse:
    chunks = x.reshape((2 * n, c) + x.shape[1:])                       # [2n, c, ...]
    pairs = jnp.stack([chunks[:n], chunks[n:][::-1]], axis=1)           # [n, 2, c, ...]: chunks d, 2n-1-d
  else:
    pairs = x.reshape((n, 2, c) + x.shape[1:])
    pairs = jnp.concatenate([pairs[:, 0], pairs[::-1, 1]], axis=0)     # [2n, c, ...]
  return jnp.moveaxis(pairs.reshape(x.shape), 0, axis)


def ring_order(length: int, n: int) -> "np.ndarray":
  """int32[length]: the natural slot of each position of the zig-zag layout."""
  import numpy as np
  return np.asarray(zigzag(jnp.arange(length, dtype=jnp.int32), n, axis=0))


def ring_block_counts(q_slots, kv_slots, n: int, block: int = BLOCK):
  """int[n]: the (query tile, key block) pairs each ring device computes for one
  sample, with the kernel's own skip rule (`visible_blocks`): the per-device work of a
  layout. q_slots, kv_slots: int[L] in the device order (L / n per device)."""
  import numpy as np
  q_slots, kv_slots = np.asarray(q_slots).reshape(n, -1), np.asarray(kv_slots).reshape(n, -1)
  block = min(block, max(q_slots.shape[1] // 2, 1))
  counts = np.zeros(n, int)
  for d in range(n):
    for j in range(0, q_slots.shape[1], block):
      top = q_slots[d, j:j + block].max()
      counts[d] += sum(int(visible_blocks(top, kv_slots[e][None], block)) for e in range(n))
  return counts


def _splash(q, k, v, kv_valid, q_slots, kv_slots, scale, block=BLOCK, interpret=False):
  """Pallas splash attention per (sample, head group): causal over slots 0..S-1 (the
  training layout: q_slots = arange(S), checked at run time, else `chunked`), padded
  keys by segment ids (a padded query sees the padded keys, never a fully masked row).
  interpret: run the kernel's Pallas interpreter instead (tests on CPU)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, s, h, _ = q.shape
  if ring_shards("splash") > 1:
    return _splash_ring(q, k, v, kv_valid, q_slots, kv_slots, scale, _current_mesh(), interpret=interpret)
  if q_slots is None or kv_slots is not None or s != k.shape[1] or s % min(block, s):
    raise ValueError(f"splash attention: causal self-attention (S = T in whole {block}-blocks) only, got "
                     f"S={s}, T={k.shape[1]}, causal={q_slots is not None}")
  blk = min(block, s)
  valid = (jnp.ones((b, s), bool) if kv_valid is None else kv_valid).astype(jnp.int32)

  def local(q, k, v, valid):
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    kernel = sk.make_splash_mha(mask=sm.MultiHeadMask([sm.CausalMask((s, s))] * q.shape[2]), head_shards=1,
                                q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)                         # [b, H, S, D]
    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v),
                           sk.SegmentIds(q=valid, kv=valid))
    return heads_first(out)

  mesh = _current_mesh()
  if mesh is not None:
    from llamavid_jax import sharding
    qs, ks, _, _ = _specs(q, k, mesh, sharding_axis(q, k, mesh))
    if sharding.shards(mesh, qs[1]) > 1:
      raise ValueError(f"splash attention: the sequence is split over {qs[1]}, not over 'sequence'")
    qs, ks = P(qs[0], None, *qs[2:]), P(ks[0], None, *ks[2:])
    local = jax.shard_map(local, mesh=mesh, in_specs=(qs, ks, ks, P(qs[0], None)), out_specs=qs, check_vma=False)
  layout = jnp.all(q_slots == jnp.arange(s, dtype=q_slots.dtype)[None])
  return jax.lax.cond(layout, lambda q, k, v: local(q, k, v, valid),
                      lambda q, k, v: _chunked(q, k, v, kv_valid, q_slots, None, scale, block), q, k, v)


# --- splash inside the ring ------------------------------------------------------------
# In the zig-zag layout (chunks d and 2n-1-d of 2n on device d, c positions each) every
# step of the ring is one of three fixed shapes: step 0 is causal self-attention over
# the device's own 2c positions (its slots increase); at step s it holds the chunks of
# device j = d - s mod n, and either j < d (all 2c queries see the first chunk of j in
# full) or j > d (the second chunk of queries sees both chunks of j in full). So each
# step is one splash call on a static mask (causal, or full 2c x c / c x 2c), picked by
# a lax.cond: only unmasked blocks are computed, and every device computes as many.
# The steps merge by their log-sum-exps. The backward pass needs each step's gradients
# against the *global* statistics (the merged output and log-sum-exp), which splash's
# public VJP cannot take (its own residuals are the step's); `_splash_block_bwd` calls
# the kernel module's backward with them. Tested in Pallas' interpreter on CPU.

def _splash_block(c: int) -> int:
  """The splash block for zig-zag chunks of c positions: gcd(c, 512), so 512, 256 or
  128; 0 where c is not a multiple of 128."""
  b = math.gcd(c, BLOCK)
  return b if b % 128 == 0 else 0


def _ring_kernels(c: int, heads: int, interpret: bool):
  """The three splash kernels of a ring step (save_residuals: they return the
  log-sum-exp): causal (2c, 2c), the early chunk full (2c, c), the late queries full
  (c, 2c)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  blk = _splash_block(c)
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  make = lambda mask: sk.make_splash_mha(mask=sm.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
                                         block_sizes=sizes, save_residuals=True, interpret=interpret)
  return make(sm.CausalMask((2 * c, 2 * c))), make(sm.FullMask((2 * c, c))), make(sm.FullMask((c, 2 * c)))


_heads_first = lambda x: jnp.swapaxes(x, 1, 2)           # [b, S, H, D] <-> [b, H, S, D]


def _splash_block_fwd(kernel, q, k, v, q_seg, kv_seg):
  """Heads first: q [b, H, s, D] (scaled), k, v [b, K, t, D], segment ids int32[b, s] /
  [b, t] -> (o float32[b, H, s, D], lse float32[b, H, s])."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  o, (lse,) = jax.vmap(kernel)(q, k, v, sk.SegmentIds(q=q_seg, kv=kv_seg))
  return o.astype(jnp.float32), lse


def _splash_block_bwd(kernel, q, k, v, q_seg, kv_seg, o, lse, do):
  """Heads first, the gradients (dq, dk, dv, float32) of one step's block against the
  merged output o [b, H, s, D] and log-sum-exp lse [b, H, s]: splash's backward kernels
  (dq, dkv) given those statistics as their residuals."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  kw = kernel.kwargs

  def collapse(info):   # as the kernel's own entry point does with partial mask blocks
    if info is None or info.partial_mask_blocks is None:
      return info
    return info._replace(partial_mask_blocks=info.partial_mask_blocks.reshape(-1, *info.partial_mask_blocks.shape[-2:]))

  def one(q, k, v, q_seg, kv_seg, o, lse, do):
    res = (q, k, v, sk.SegmentIds(q=q_seg, kv=kv_seg), None, o, lse, collapse(kernel.dq_mask_info),
           collapse(kernel.dkv_mask_info))
    grads = sk._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"],
                                     kw["residual_checkpoint_name"], kw["mask_function"],
                                     kw["attn_logits_soft_cap"], kw["interpret"], res, do)
    return grads[3:6]

  return tuple(g.astype(jnp.float32) for g in jax.vmap(one)(q, k, v, q_seg, kv_seg, o, lse, do))


def _merge(o, lse, o_s, lse_s):
  """Two partial softmaxes over disjoint keys (o [b, H, s, D], lse [b, H, s]) -> their
  union's (o, lse)."""
  new = jnp.logaddexp(lse, lse_s)
  return o * jnp.exp(lse - new)[..., None] + o_s * jnp.exp(lse_s - new)[..., None], new


def _splash_ring_fwd_local(use, q, k, v, seg, q_slots, k_slots, *, axis, interpret):
  """Per device: q [b, 2c, H, D] (scaled), k, v [b, 2c, K, D], seg int32[b, 2c] (1 real,
  0 padding) -> (o float32[b, 2c, H, D], lse float32[b, H, 2c]): the splash steps where
  `use` (the layout is zig-zag), else the blockwise kernel's on the slots. The splash
  steps work heads first (the kernels' layout), transposed once, not a step at a time."""
  n, d = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
  b, s, h, dh = q.shape
  c = s // 2

  def splash():
    causal, early, late = _ring_kernels(c, h, interpret)
    qh = _heads_first(q)                               # [b, H, 2c, D]
    kv = (_heads_first(k), _heads_first(v), seg)        # [b, K, 2c, D] x 2, [b, 2c]: they travel
    o, lse = _splash_block_fwd(causal, qh, *kv[:2], seg, seg)

    def step(i, carry):
      o, lse, kv = carry
      kv = ring_shift(kv, axis)                       # now device d - i's chunks

      def from_early(o, lse, kc, vc, sc):              # j < d: all queries, j's first chunk
        return _merge(o, lse, *_splash_block_fwd(early, qh, kc[:, :, :c], vc[:, :, :c], seg, sc[:, :c]))

      def from_late(o, lse, kc, vc, sc):               # j > d: the second chunk of queries, all of j
        o2, l2 = _merge(o[:, :, c:], lse[..., c:], *_splash_block_fwd(late, qh[:, :, c:], kc, vc, seg[:, c:], sc))
        return o.at[:, :, c:].set(o2), lse.at[..., c:].set(l2)

      return (*jax.lax.cond((d - i) % n < d, from_early, from_late, o, lse, *kv), kv)

    o, lse, _ = _loop(n - 1, lambda i, carry: step(i + 1, carry), (o, lse, kv))
    return _heads_first(o), lse

  def blockwise():
    o, lse = _local_fwd(q, k, v, q_slots, seg > 0, k_slots, scale=1.0, axis=axis, block=_splash_block(c))
    return o.reshape(b, s, h, dh), lse.reshape(b, h, s)

  return jax.lax.cond(use, splash, blockwise)


def _splash_ring_bwd_local(use, q, k, v, seg, q_slots, k_slots, o, lse, do, *, axis, interpret):
  """The backward pass per device: the same steps, each block's gradients against the
  merged statistics; dK/dV travel with their chunks and come home at the end."""
  n, d = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
  b, s, h, dh = q.shape
  c = s // 2

  def splash():
    causal, early, late = _ring_kernels(c, h, interpret)
    qh, oh, doh = _heads_first(q), _heads_first(o), _heads_first(do)
    kh, vh = _heads_first(k), _heads_first(v)
    dq, dk, dv = _splash_block_bwd(causal, qh, kh, vh, seg, seg, oh, lse, doh)

    def step(i, carry):
      dq, travel = carry
      kc, vc, sc, dk, dv = ring_shift(travel, axis)

      def from_early(dq, dk, dv):                      # in place: no padded copies of a step's gradients
        gq, gk, gv = _splash_block_bwd(early, qh, kc[:, :, :c], vc[:, :, :c], seg, sc[:, :c], oh, lse, doh)
        return dq + gq, dk.at[:, :, :c].add(gk), dv.at[:, :, :c].add(gv)

      def from_late(dq, dk, dv):
        gq, gk, gv = _splash_block_bwd(late, qh[:, :, c:], kc, vc, seg[:, c:], sc, oh[:, :, c:], lse[..., c:],
                                       doh[:, :, c:])
        return dq.at[:, :, c:].add(gq), dk + gk, dv + gv

      dq, dk, dv = jax.lax.cond((d - i) % n < d, from_early, from_late, dq, dk, dv)
      return dq, (kc, vc, sc, dk, dv)

    dq, travel = _loop(n - 1, lambda i, carry: step(i + 1, carry), (dq, (kh, vh, seg, dk, dv)))
    dk, dv = ring_shift(travel[3:], axis)            # the n-th shift: home
    return tuple(_heads_first(g).astype(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))

  def blockwise():
    kh = k.shape[2]
    return _local_bwd(q, k, v, q_slots, seg > 0, k_slots, o.reshape(b, s, kh, h // kh, dh),
                      lse.reshape(b, kh, h // kh, s), do, scale=1.0, axis=axis, block=_splash_block(c))

  return jax.lax.cond(use, splash, blockwise)


def _splash_ring_specs(q, k, mesh, axis):
  qs, ks, qsl, _ = _specs(q, k, mesh, axis)
  return qs, ks, qsl, P(qs[0], qs[2], qs[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _splash_ring_op(use, q, k, v, seg, q_slots, k_slots, axis, mesh, interpret):
  return _splash_ring_op_fwd(use, q, k, v, seg, q_slots, k_slots, axis, mesh, interpret)[0]


def _splash_ring_op_fwd(use, q, k, v, seg, q_slots, k_slots, axis, mesh, interpret):
  qs, ks, sl, stat = _splash_ring_specs(q, k, mesh, axis)
  fwd = jax.shard_map(functools.partial(_splash_ring_fwd_local, axis=axis, interpret=interpret), mesh=mesh,
                      in_specs=(P(), qs, ks, ks, sl, sl, sl), out_specs=(qs, stat), check_vma=False)
  o, lse = fwd(use, q, k, v, seg, q_slots, k_slots)
  o = o.astype(q.dtype)   # the output, and the residual (what splash's own VJP keeps)
  return o, (use, q, k, v, seg, q_slots, k_slots, o, lse)


def _splash_ring_op_bwd(axis, mesh, interpret, res, g):
  use, q, k, v, seg, q_slots, k_slots, o, lse = res
  qs, ks, sl, stat = _splash_ring_specs(q, k, mesh, axis)
  bwd = jax.shard_map(functools.partial(_splash_ring_bwd_local, axis=axis, interpret=interpret), mesh=mesh,
                      in_specs=(P(), qs, ks, ks, sl, sl, sl, qs, stat, qs), out_specs=(qs, ks, ks), check_vma=False)
  return (None, *bwd(use, q, k, v, seg, q_slots, k_slots, o, lse, g), None, None, None)


_splash_ring_op.defvjp(_splash_ring_op_fwd, _splash_ring_op_bwd)


def _splash_ring(q, k, v, kv_valid, q_slots, kv_slots, scale, mesh, axis="sequence", interpret=False):
  """`splash` with the sequence split over `axis`: the ring above for the training
  layout in zig-zag order (q_slots = kv_slots = `ring_order`, what
  `LlamaVid.hidden_states` lays out; checked at run time), the blockwise kernel's steps
  for any other. The fallback is a branch inside each shard_map of the one custom VJP:
  a `lax.cond` between this ring and `_ring` crashes libtpu's memory space assignment
  (jax 0.10.2, "Check failed: preferred_offset ... Aliased use"), and the ring without
  a branch there fails its copy insertion ("Can't deep copy instruction tuple"). XLA
  keeps the fallback's buffers apart: 3 GiB a chip at 1M positions on 4 chips."""
  n, (b, s) = mesh.shape[axis], q.shape[:2]
  if q_slots is None or kv_slots is None or s != k.shape[1] or s % (2 * n) or not _splash_block(s // (2 * n)):
    raise ValueError(f"splash attention on a ring of {n}: causal self-attention with key slots, in chunks of "
                     f"a multiple of 128 positions (S = 2 x {n} x c), got S={s}, T={k.shape[1]}, "
                     f"causal={q_slots is not None}, key slots={kv_slots is not None}")
  order = zigzag(jnp.arange(s, dtype=jnp.int32), n, axis=0)[None]
  use = jnp.all(q_slots == order) & jnp.all(kv_slots == order)
  seg = (jnp.ones((b, s), bool) if kv_valid is None else kv_valid).astype(jnp.int32)
  # q scaled here (splash takes no scale), so the kernels' dq is d(loss)/d(scaled q)
  return _splash_ring_op(use, q * jnp.asarray(scale, q.dtype), k, v, seg, q_slots.astype(jnp.int32),
                         kv_slots.astype(jnp.int32), axis, mesh, interpret)


def target_backend() -> str:
  """The platform the current computation is for: that of the enclosing mesh's devices
  (a TPU topology's in an ahead-of-time plan on a CPU host), else JAX's default."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


def auto_impl(q_shape, k_shape, causal: bool, explicit_slots: bool, backend: str | None = None,
              dtype=jnp.bfloat16) -> str:
  """What `auto` runs: where the current mesh splits the sequence, a ring (of splash
  steps on TPU, else `ring`); else per
  backend, `splash` on TPU (causal self-attention in whole blocks), `cudnn` on GPU (in
  bf16 / fp16: cuDNN's flash kernel has no fp32), `chunked` elsewhere (and wherever the
  fused kernels do not apply)."""
  backend = backend or target_backend()
  s, t = q_shape[1], k_shape[1]
  n = ring_shards("ring")
  if n > 1:   # splash inside the ring on TPU, for the zig-zag training layout in whole 128-blocks
    fits = causal and s == t and s % (2 * n) == 0 and _splash_block(s // (2 * n))
    return "splash" if backend == "tpu" and fits else "ring"
  if backend == "tpu" and causal and not explicit_slots and s == t and s >= 128 and s % min(BLOCK, s) == 0:
    return "splash"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend in ("gpu", "cuda", "rocm") and causal and not explicit_slots and s == t and half:
    return "cudnn"
  return "chunked"


def _auto(q, k, v, kv_valid, q_slots, kv_slots, scale):
  impl = auto_impl(q.shape, k.shape, q_slots is not None, kv_slots is not None, dtype=q.dtype)
  return IMPLS[impl](q, k, v, kv_valid, q_slots, kv_slots, scale)


IMPLS: dict[str, Callable] = {"xla": _xla, "cudnn": _cudnn, "reference": _reference,
                              "chunked": _chunked, "ring": _ring, "splash": _splash, "auto": _auto}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_valid: jax.Array | None = None,
              q_slots: jax.Array | None = None, kv_slots: jax.Array | None = None, impl: str = "xla",
              scale: float | None = None) -> jax.Array:
  """Scaled dot-product attention -> float[B, S, H, Dh] (see the module docstring)."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl {impl!r}: expected one of {sorted(IMPLS)}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return IMPLS[impl](q, k, v, kv_valid, q_slots, kv_slots, scale)
