"""The blockwise flash kernel (online softmax over key blocks, flash-style recomputing
backward as a custom VJP), pure JAX on any backend, and its two uses:

  chunked  one device: O(S * block) memory
  ring     sequence-sharded over the mesh axes of the logical `length` axis (ring attention,
           Liu et al. 2023): each device keeps its query chunk while key/value chunks travel
           around the ring; the backward pass sends dK/dV around with them. A step whose
           chunk is wholly in the future does no work; in the zig-zag layout
           (`parallel.layout`) every device does the same number of blocks. Fewer
           queries than devices (a decode step on a KV cache sharded along its length):
           the keys stay where they lie and the partial softmaxes are combined
           (`_sharded_keys`, forward only).

Layout inside: q float32[b, s, K, G, d] (pre-scaled), k/v float32[b, t, K, d]; statistics
m, l float32[b, K, G, s]; accumulators as q.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from llamavid_jax import sharding
from llamavid_jax.ops.attention.masks import NEG, block_mask, key_slots
from llamavid_jax.parallel.layout import ring_shift

BLOCK = 512   # keys per inner block of `chunked` / `ring`


def loop(n, body, carry):
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
      mask = block_mask(sj, _tile(k_slots, i, block), _tile(k_valid, i, block))
      s = jnp.where(mask, s, NEG)
      m_new = jnp.maximum(mj, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(mj - m_new)
      lj = lj * corr + p.sum(-1)
      oj = oj * jnp.moveaxis(corr, -1, 1)[..., None] + jnp.einsum("bkgqt,btkd->bqkgd", p, _tile(v, i, block).astype(jnp.float32))
      return oj, m_new, lj

    n = visible_blocks(jnp.max(sj), k_slots, block)
    oj, mj, lj = loop(n, body, (_tile(o, j, qb), _tile(m, j, qb, 3), _tile(l, j, qb, 3)))
    return _put(o, oj, j, qb), _put(m, mj, j, qb, 3), _put(l, lj, j, qb, 3)

  return loop(q.shape[1] // qb, tile, carry)


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
      mask = block_mask(sj, _tile(k_slots, i, block), _tile(k_valid, i, block))
      p = jnp.where(mask, jnp.exp(s - lse_j[..., None]), 0.0)            # [b, K, G, qb, blk]
      ds = p * (jnp.einsum("bqkgd,btkd->bkgqt", doj, vb) - delta_j[..., None])
      dqj = dqj + jnp.einsum("bkgqt,btkd->bqkgd", ds, kb)
      dk = _put(dk, _tile(dk, i, block) + jnp.einsum("bkgqt,bqkgd->btkd", ds, qj), i, block)
      dv = _put(dv, _tile(dv, i, block) + jnp.einsum("bkgqt,bqkgd->btkd", p, doj), i, block)
      return dqj, dk, dv

    n = visible_blocks(jnp.max(sj), k_slots, block)
    dqj, dk, dv = loop(n, body, (_tile(dq, j, qb), dk, dv))
    return _put(dq, dqj, j, qb), dk, dv

  return loop(q.shape[1] // qb, tile, carry)


def local_fwd(q, k, v, q_slots, kv_valid, kv_slots, *, scale, axis, block):
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

  (o, m, l), kv = loop(n - 1, step, ((o, m, l), kv))
  o, m, l = _fwd_chunk(qg, kv[0], kv[1], q_slots, kv[2], kv[3], (o, m, l), block, scale)
  safe_l = jnp.where(l > 0, l, 1.0)
  o = o / jnp.moveaxis(safe_l, -1, 1)[..., None]
  return o, m + jnp.log(safe_l)


def local_bwd(q, k, v, q_slots, kv_valid, kv_slots, o, lse, do, *, scale, axis, block):
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

  dq, travel = loop(n, step, (dq, travel))
  dk, dv = travel[4], travel[5]
  return (dq * scale).reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def current_mesh():
  """The mesh of the enclosing `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _rules():
  return nn.get_logical_axis_rules() or sharding.LOGICAL_RULES


def length_axis(mesh=None):
  """-> (the mesh axes the logical rules put the LLM `length` on, as a PartitionSpec
  entry, their number of devices) on `mesh` (default: the current one; (None, 1) without)."""
  mesh = current_mesh() if mesh is None else mesh
  if mesh is None:
    return None, 1
  entry = sharding.logical_to_spec(("length",), _rules())[0]
  return entry, sharding.shards(mesh, entry)


def ring_specs(q, k, mesh, axis):
  """PartitionSpecs of q/k/v, kv_valid and q_slots from the active logical rules."""
  rules = _rules()
  qs = sharding.fit_spec(sharding.logical_to_spec(("batch", "length", "heads", "kv"), rules), q.shape, mesh)
  ks = sharding.fit_spec(sharding.logical_to_spec(("batch", "length", "kv_heads", "kv"), rules), k.shape, mesh)
  if qs[1] != axis or ks[1] != axis:
    raise ValueError(f"ring attention: the sequence must be sharded over {axis!r}, got {qs} / {ks}")
  if qs[2] != ks[2]:   # q heads reshape to (K, G) locally: shard both or neither
    qs, ks = P(*qs[:2], None, None), P(*ks[:2], None, None)
  return qs, ks, P(qs[0], qs[1]), P(ks[0], ks[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _blockwise(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh):
  return _blockwise_fwd(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh)[0]


def _blockwise_fwd(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh):
  fwd = functools.partial(local_fwd, scale=scale, axis=axis, block=block)
  if axis is not None:
    qs, ks, qsl, kvl = ring_specs(q, k, mesh, axis)
    stat = P(qs[0], qs[2], None, qs[1])
    fwd = jax.shard_map(fwd, mesh=mesh, in_specs=(qs, ks, ks, qsl, kvl, kvl),
                        out_specs=(P(*qs[:3], None, None), stat), check_vma=False)
  o, lse = fwd(q, k, v, q_slots, kv_valid, kv_slots)
  out = o.reshape(q.shape).astype(q.dtype)
  return out, (q, k, v, kv_valid, q_slots, kv_slots, o, lse)


def _blockwise_bwd(scale, axis, block, mesh, res, g):
  q, k, v, kv_valid, q_slots, kv_slots, o, lse = res
  bwd = functools.partial(local_bwd, scale=scale, axis=axis, block=block)
  if axis is not None:
    qs, ks, qsl, kvl = ring_specs(q, k, mesh, axis)
    stat = P(qs[0], qs[2], None, qs[1])
    bwd = jax.shard_map(bwd, mesh=mesh, in_specs=(qs, ks, ks, qsl, kvl, kvl, P(*qs[:3], None, None), stat, qs),
                        out_specs=(qs, ks, ks), check_vma=False)
  dq, dk, dv = bwd(q, k, v, q_slots, kv_valid, kv_slots, o, lse, g)
  return dq, dk, dv, None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def prepare(q, k, kv_valid, q_slots, kv_slots, block):
  b, s, t = q.shape[0], q.shape[1], k.shape[1]
  kv_valid = jnp.ones((b, t), bool) if kv_valid is None else kv_valid
  causal = q_slots is not None
  q_slots = q_slots if causal else jnp.full((b, s), jnp.iinfo(jnp.int32).max, jnp.int32)   # sees every slot
  return kv_valid, q_slots.astype(jnp.int32), key_slots(kv_slots, b, t), min(block, t)


def chunked(q, k, v, kv_valid, q_slots, kv_slots, scale, block=BLOCK):
  kv_valid, q_slots, kv_slots, block = prepare(q, k, kv_valid, q_slots, kv_slots, block)
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


def ring(q, k, v, kv_valid, q_slots, kv_slots, scale, block=BLOCK):
  mesh = current_mesh()
  axis, n = length_axis(mesh)
  if n == 1:
    return chunked(q, k, v, kv_valid, q_slots, kv_slots, scale, block)
  kv_valid, q_slots, kv_slots, _ = prepare(q, k, kv_valid, q_slots, kv_slots, block)
  block = min(block, max(k.shape[1] // n // 2, 1))   # a zig-zag chunk is two halves: no block straddles them
  if k.shape[1] % (n * block):
    raise ValueError(f"ring attention: {k.shape[1]} keys do not split into {n} chunks of blocks of {block} "
                     f"(`ring_length` gives a length that does)")
  if q.shape[1] < n:   # a decode step: the queries stay whole, the keys (a KV cache) stay where they are
    return _sharded_keys(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh)
  return _blockwise(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh)


def ring_length(length: int, n: int, block: int = BLOCK) -> int:
  """The smallest key length >= `length` that `ring` splits over n devices: n chunks
  of whole blocks (a chunk of up to 2 blocks: an even number of keys; longer: whole
  `block`s). A KV cache sharded over the ring is sized with it."""
  if n <= 1:
    return length
  per = -(-length // n)
  step = 2 if per <= 2 * block else block
  return n * (-(-per // step) * step)


def _sharded_keys(q, k, v, kv_valid, q_slots, kv_slots, scale, axis, block, mesh):
  """Attention of a few queries (a decode step: q [b, s < n, H, d], replicated over the
  ring) to keys split over the ring (a KV cache sharded along its length): each device
  folds its own key chunk (no key moves), then the partial softmaxes are combined with
  one pmax and two psums of [b, s, H, d]-sized values (flash-decoding's split-K).
  Forward only: decoding is never differentiated."""
  ks = sharding.fit_spec(sharding.logical_to_spec(("batch", "length", "kv_heads", "kv"), _rules()), k.shape, mesh)
  if ks[1] != axis:
    raise ValueError(f"attention to a sharded KV cache: its length must be sharded over {axis!r}, got {ks}")
  qs, qsl, kvl = P(ks[0], None, ks[2], None), P(ks[0], None), P(ks[0], ks[1])   # q heads split as kv heads

  def local(q, k, v, q_slots, kv_valid, kv_slots):
    o, lse = local_fwd(q, k, v, q_slots, kv_valid, kv_slots, scale=scale, axis=None, block=block)
    m = jax.lax.pmax(lse, axis)                                          # [b, K, G, s]
    w = jnp.exp(lse - m)                                                 # this chunk's share
    den = jax.lax.psum(w, axis)
    o = jax.lax.psum(o * jnp.moveaxis(w, -1, 1)[..., None], axis)        # [b, s, K, G, d]
    return o / jnp.moveaxis(den, -1, 1)[..., None]

  out = jax.shard_map(local, mesh=mesh, in_specs=(qs, ks, ks, qsl, kvl, kvl), out_specs=P(ks[0], None, ks[2]),
                      check_vma=False)(q, k, v, q_slots, kv_valid, kv_slots)
  return out.reshape(q.shape).astype(q.dtype)


def ring_block_counts(q_slots, kv_slots, n: int, block: int = BLOCK):
  """int[n]: the (query tile, key block) pairs each ring device computes for one
  sample, with the kernel's own skip rule (`visible_blocks`): the per-device work of a
  layout. q_slots, kv_slots: int[L] in the device order (L / n per device)."""
  q_slots, kv_slots = np.asarray(q_slots).reshape(n, -1), np.asarray(kv_slots).reshape(n, -1)
  block = min(block, max(q_slots.shape[1] // 2, 1))
  counts = np.zeros(n, int)
  for d in range(n):
    for j in range(0, q_slots.shape[1], block):
      top = q_slots[d, j:j + block].max()
      counts[d] += sum(int(visible_blocks(top, kv_slots[e][None], block)) for e in range(n))
  return counts


