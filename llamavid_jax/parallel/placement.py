"""Frame tokens to their LLM positions when the LLM length is split over devices.

The model splices frame tokens with a placement callable `place(flat, src, text_len=,
monotone=) -> float[B, S', D]` (position p takes flat[src[p]]); its default is a plain
gather (`models.llamavid.gather`). On a mesh whose logical `length` axis is split over G
devices a gather would all-gather all K frame tokens on every device (32 GiB a chip for
2M frames at 4M positions): `ring_placement` sends the blocks round the ring instead.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from llamavid_jax import sharding
from llamavid_jax.parallel.layout import Decision, ring_shift

log = logging.getLogger(__name__)


def ring_rounds(g: int, lk: int, ls: int, text_len: int) -> int:
  """Rounds of the ring placement that reach every source of a monotone placement
  (p - S < src[p] <= p, S = text_len) over G devices (blocks of Lk sources, Ls positions):
  device i visits blocks i + 1, i, i - 1, ... down to the lowest its positions i Ls .. reach."""
  if g * (ls - lk) > lk:             # src[p] <= p < (i + 1) Ls may lie beyond block i + 1
    return g
  return min(g, max(i + 2 - max(0, (i * ls - text_len + 1) // lk) for i in range(g)))


def _spec(mesh, b: int, s_out: int, d: int):
  rules = nn.get_logical_axis_rules() or sharding.LOGICAL_RULES
  return sharding.fit_spec(sharding.logical_to_spec(("batch", "length", None), rules), (b, s_out, d), mesh)


def placement_decision(mesh, b: int, k: int, s_out: int, d: int = 1) -> Decision:
  """How K frame tokens reach S' positions on `mesh` (kind "gather", "ring" or the
  fallback "all-gather"). Reads the logical rules in effect (else sharding.LOGICAL_RULES)."""
  if mesh is None or mesh.empty:
    return Decision("gather", "frame tokens: plain gather (no mesh)")
  spec = _spec(mesh, b, s_out, d)
  g = sharding.shards(mesh, spec[1])
  if g == 1:
    asked = sharding.shards(mesh, sharding.logical_to_spec(("length",), nn.get_logical_axis_rules() or
                                                           sharding.LOGICAL_RULES)[0])
    if asked > 1:
      return Decision("gather", f"frame tokens: plain gather ({s_out} positions do not split over {asked} devices: "
                                f"the length stays whole on each)")
    return Decision("gather", "frame tokens: plain gather (the LLM length is not split)")
  if k % g or s_out % g:
    return Decision("all-gather", f"frame tokens: ALL-GATHER of {k} tokens on each of {g} devices ({k} tokens or "
                                  f"{s_out} positions do not split into {g} blocks; the ring placement needs both to)")
  return Decision("ring", f"frame tokens: ring placement over {g} devices ({k // g} tokens, {s_out // g} positions "
                          f"a block)")


def ring_placement(strict: bool = True):
  """-> place(flat, src, text_len=, monotone=): the ring placement on the enclosing mesh
  (`jax.set_mesh`), the plain gather where no mesh splits the length. Where the blocks do
  not divide: strict raises ValueError; else the all-gather, logged as a decision."""

  def place(flat, src, *, text_len: int, monotone: bool):
    mesh = jax.sharding.get_abstract_mesh()
    b, k, d = flat.shape
    decision = placement_decision(None if mesh.empty else mesh, b, k, src.shape[1], d)
    if decision.kind == "all-gather":
      if strict:
        raise ValueError(f"{decision.why}; pad the frames or the text, or pass ring_placement(strict=False)")
      log.warning("%s", decision.why)
    if decision.kind != "ring":
      return jnp.take_along_axis(flat, src[..., None], 1)   # the model's own gather
    return _ring_place(flat, src, text_len, monotone, mesh)

  return place


def _ring_place(flat, src, text_len: int, monotone: bool, mesh):
  """The blocks travel round the ring, one ppermute a round (ring attention's pattern),
  and each device picks its positions' tokens out of the block it holds: two blocks in
  memory. G rounds visit every block; `monotone` placements (one placeholder, or movie
  mode: the frame tokens in order, fewer than S text positions before any, so
  p - S < src[p] <= p) need only `ring_rounds`."""
  b, k, d = flat.shape
  s_out = src.shape[1]
  spec = _spec(mesh, b, s_out, d)
  axes, g = sharding.spec_axes(spec[1]), sharding.shards(mesh, spec[1])
  lk, ls = k // g, s_out // g
  rounds = ring_rounds(g, lk, ls, text_len) if monotone else g
  axis = axes[0] if len(axes) == 1 else axes

  def owned(src, r):   # round r: device i holds block i + 1 - r -> (index into it, hit) [b, Ls]
    idx = src - ((jax.lax.axis_index(axis) + 1 - r) % g) * lk
    return jnp.clip(idx, 0, lk - 1), (idx >= 0) & (idx < lk)

  def forward(blk, src):                                # blk [b, Lk, D]; src [b, Ls] -> [b, Ls, D]
    def visit(r, carry):
      held, out = carry
      idx, hit = owned(src, r)
      out = jnp.where(hit[..., None], jnp.take_along_axis(held, idx[..., None], 1), out)
      return ring_shift(held, axis), out

    out = jnp.zeros((blk.shape[0], ls, d), blk.dtype)
    return jax.lax.fori_loop(0, rounds, visit, (ring_shift(blk, axis, -1), out))[1]   # starts at block i + 1

  def backward(src, ct):                                # ct [b, Ls, D] -> d blk [b, Lk, D]
    def visit(r, acc):                                  # acc: block i + 1 - r's, travelling with it
      idx, hit = owned(src, r)
      add = jax.vmap(lambda a, i, x: a.at[i].add(x))
      return ring_shift(add(acc, idx, jnp.where(hit[..., None], ct, 0)), axis)

    acc = jax.lax.fori_loop(0, rounds, visit, jnp.zeros((ct.shape[0], lk, d), ct.dtype))
    return ring_shift(acc, axis, 1 - rounds)            # block i + 1 - rounds + 1, home to its device

  # A custom VJP so that the backward pass is the reverse ring (each block's gradient
  # travels and is added to where its tokens were picked): autodiff of the loop would
  # keep every round's [b, Ls, D] select mask (8.5 GiB a chip at 4M positions).
  @jax.custom_vjp
  def place(blk, src):
    return forward(blk, src)

  place.defvjp(lambda blk, src: (forward(blk, src), src), lambda src, ct: (backward(src, ct), None))
  local = jax.shard_map(place, mesh=mesh, in_specs=(spec, P(*spec[:2])), out_specs=spec, check_vma=False)
  return local(flat, src)
