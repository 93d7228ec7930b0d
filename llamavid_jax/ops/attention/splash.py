"""TPU: Pallas splash attention, on one device and as a ring of splash steps.

  splash       causal self-attention of training (query i at slot i, S = T in whole blocks;
               padding by segment ids), shard_mapped over batch and heads; other layouts
               take `chunked` at run time
  splash ring  the same with the LLM length split over the mesh axes of the logical
               `length` axis, in the zig-zag layout: one static-mask kernel a step, no
               masked block

The kernel is the vendored copy of JAX's (third_party/), whose backward given outside
statistics (`splash_attention_bwd_from_stats`) the ring needs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from llamavid_jax import jax_compat, sharding
from llamavid_jax.ops.attention.blockwise import (BLOCK, chunked, current_mesh, length_axis, local_bwd, local_fwd,
                                                  loop, ring_specs)
from llamavid_jax.ops.attention.third_party import splash_attention_kernel as sk
from llamavid_jax.parallel.layout import ring_shift, zigzag


def splash(q, k, v, kv_valid, q_slots, kv_slots, scale, block=BLOCK, interpret=False):
  """Pallas splash attention per (sample, head group): causal over slots 0..S-1 (the
  training layout: q_slots = arange(S), checked at run time, else `chunked`), padded
  keys by segment ids (a padded query sees the padded keys, never a fully masked row).
  With the length split over a ring: `splash_ring`. interpret: run the kernel's Pallas
  interpreter instead (tests on CPU)."""
  jax_compat.require_splash_vendored()
  b, s, h, _ = q.shape
  mesh = current_mesh()
  axis, n = length_axis(mesh)
  if n > 1:
    return splash_ring(q, k, v, kv_valid, q_slots, kv_slots, scale, mesh, axis, interpret=interpret)
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
    out = jax.vmap(kernel)(_heads_first(q * jnp.asarray(scale, q.dtype)), _heads_first(k), _heads_first(v),
                           sk.SegmentIds(q=valid, kv=valid))
    return _heads_first(out)

  if mesh is not None:
    qs, ks, _, _ = ring_specs(q, k, mesh, axis)
    qs, ks = P(qs[0], None, *qs[2:]), P(ks[0], None, *ks[2:])
    local = jax.shard_map(local, mesh=mesh, in_specs=(qs, ks, ks, P(qs[0], None)), out_specs=qs, check_vma=False)
  layout = jnp.all(q_slots == jnp.arange(s, dtype=q_slots.dtype)[None])
  return jax.lax.cond(layout, lambda q, k, v: local(q, k, v, valid),
                      lambda q, k, v: chunked(q, k, v, kv_valid, q_slots, None, scale, block), q, k, v)


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
# the vendored kernel's `splash_attention_bwd_from_stats` with them. Tested in Pallas' interpreter on CPU.

def splash_block(c: int) -> int:
  """The splash block for zig-zag chunks of c positions: gcd(c, 512), so 512, 256 or
  128; 0 where c is not a multiple of 128."""
  b = math.gcd(c, BLOCK)
  return b if b % 128 == 0 else 0


def _ring_kernels(c: int, heads: int, interpret: bool):
  """The three splash kernels of a ring step (save_residuals: they return the
  log-sum-exp): causal (2c, 2c), the early chunk full (2c, c), the late queries full
  (c, 2c)."""
  blk = splash_block(c)
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  make = lambda mask: sk.make_splash_mha(mask=sm.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
                                         block_sizes=sizes, save_residuals=True, interpret=interpret)
  return make(sm.CausalMask((2 * c, 2 * c))), make(sm.FullMask((2 * c, c))), make(sm.FullMask((c, 2 * c)))


_heads_first = lambda x: jnp.swapaxes(x, 1, 2)           # [b, S, H, D] <-> [b, H, S, D]


def _splash_block_fwd(kernel, q, k, v, q_seg, kv_seg):
  """Heads first: q [b, H, s, D] (scaled), k, v [b, K, t, D], segment ids int32[b, s] /
  [b, t] -> (o float32[b, H, s, D], lse float32[b, H, s])."""
  o, (lse,) = jax.vmap(kernel)(q, k, v, sk.SegmentIds(q=q_seg, kv=kv_seg))
  return o.astype(jnp.float32), lse


def _splash_block_bwd(kernel, q, k, v, q_seg, kv_seg, o, lse, do):
  """Heads first, the gradients (dq, dk, dv, float32) of one step's block against the
  merged output o [b, H, s, D] and log-sum-exp lse [b, H, s]: splash's backward kernels
  (dq, dkv) given those statistics as their residuals."""
  one = lambda q, k, v, q_seg, kv_seg, o, lse, do: sk.splash_attention_bwd_from_stats(
      kernel, q, k, v, sk.SegmentIds(q=q_seg, kv=kv_seg), o, lse, do)
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

    o, lse, _ = loop(n - 1, lambda i, carry: step(i + 1, carry), (o, lse, kv))
    return _heads_first(o), lse

  def blockwise():
    o, lse = local_fwd(q, k, v, q_slots, seg > 0, k_slots, scale=1.0, axis=axis, block=splash_block(c))
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

    dq, travel = loop(n - 1, lambda i, carry: step(i + 1, carry), (dq, (kh, vh, seg, dk, dv)))
    dk, dv = ring_shift(travel[3:], axis)            # the n-th shift: home
    return tuple(_heads_first(g).astype(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))

  def blockwise():
    kh = k.shape[2]
    return local_bwd(q, k, v, q_slots, seg > 0, k_slots, o.reshape(b, s, kh, h // kh, dh),
                      lse.reshape(b, kh, h // kh, s), do, scale=1.0, axis=axis, block=splash_block(c))

  return jax.lax.cond(use, splash, blockwise)


def _splash_ring_specs(q, k, mesh, axis):
  qs, ks, qsl, _ = ring_specs(q, k, mesh, axis)
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


def splash_ring(q, k, v, kv_valid, q_slots, kv_slots, scale, mesh, axis, interpret=False):
  """`splash` with the sequence split over `axis`: the ring above for the training
  layout in zig-zag order (q_slots = kv_slots = `parallel.ring_order`, what the train
  step lays out; checked at run time), the blockwise kernel's steps
  for any other. The fallback is a branch inside each shard_map of the one custom VJP:
  a `lax.cond` between this ring and `blockwise.ring` crashes libtpu's memory space assignment
  (jax 0.10.2, "Check failed: preferred_offset ... Aliased use"), and the ring without
  a branch there fails its copy insertion ("Can't deep copy instruction tuple"). XLA
  keeps the fallback's buffers apart: 3 GiB a chip at 1M positions on 4 chips."""
  n, (b, s) = sharding.shards(mesh, axis), q.shape[:2]
  if q_slots is None or kv_slots is None or s != k.shape[1] or s % (2 * n) or not splash_block(s // (2 * n)):
    raise ValueError(f"splash attention on a ring of {n}: causal self-attention with key slots, in chunks of "
                     f"a multiple of 128 positions (S = 2 x {n} x c), got S={s}, T={k.shape[1]}, "
                     f"causal={q_slots is not None}, key slots={kv_slots is not None}")
  order = zigzag(jnp.arange(s, dtype=jnp.int32), n, axis=0)[None]
  use = jnp.all(q_slots == order) & jnp.all(kv_slots == order)
  seg = (jnp.ones((b, s), bool) if kv_valid is None else kv_valid).astype(jnp.int32)
  # q scaled here (splash takes no scale), so the kernels' dq is d(loss)/d(scaled q)
  return _splash_ring_op(use, q * jnp.asarray(scale, q.dtype), k, v, seg, q_slots.astype(jnp.int32),
                         kv_slots.astype(jnp.int32), axis, mesh, interpret)
