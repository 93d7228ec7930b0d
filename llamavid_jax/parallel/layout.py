"""The context layout of the LLM sequence: which positions each ring device holds.

Causal attention over n contiguous chunks gives device d work for d + 1 chunks: the last
device does n times the first's. Zig-zag (the layout of Megatron-LM's context parallelism
and of the zig-zag ring flash attention) cuts the sequence into 2n chunks and gives device
d chunks d and 2n-1-d: every device then computes the same number of blocks.

The train step decides the layout once (`context_layout`) and applies it to the spliced
embeddings with their positions, slots and padding, and to the loss targets; attention
sees the order through its key slots. Nothing here names a mesh axis: the ring size is
read off the logical rules (`length`) by the caller.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Decision(NamedTuple):
  """A choice made before compiling: its kind and one line for the run's plan report."""
  kind: str
  why: str


def ring_shift(xs, axis, step: int = 1):
  """Inside a shard_map: every device's xs (any pytree) sent to device i + step (mod n)
  of `axis` (a name or a tuple of names; None: unchanged). step 1 is the ring's turn."""
  if axis is None:
    return xs
  n = jax.lax.axis_size(axis)
  return jax.lax.ppermute(xs, axis, [(i, (i + step) % n) for i in range(n)])


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


def ring_order(length: int, n: int) -> np.ndarray:
  """int32[length]: the natural slot of each position of the zig-zag layout."""
  return np.asarray(zigzag(jnp.arange(length, dtype=jnp.int32), n, axis=0))


@dataclasses.dataclass(frozen=True)
class ContextLayout:
  """The order of the LLM sequence: natural (n = 1) or zig-zag over n ring devices.

  apply: [B, S', ...] arrays from the natural order into this one; invert: back;
  kv_slots: what attention takes as key slots (None in the natural order, where a key's
  slot is its index)."""
  n: int = 1
  why: str = "natural order (no ring)"

  @property
  def ring(self) -> bool:
    return self.n > 1

  def apply(self, *xs):
    out = tuple(zigzag(x, self.n) if self.ring else x for x in xs)
    return out if len(out) > 1 else out[0]

  def invert(self, x):
    return zigzag(x, self.n, inverse=True) if self.ring else x

  def kv_slots(self, slots):
    return slots if self.ring else None


def context_layout(ring_shards: int, length: int) -> ContextLayout:
  """The layout of a sequence of `length` positions on a ring of `ring_shards` devices:
  zig-zag when the ring has more than one device and the length splits into 2n chunks;
  otherwise the natural order (attention's ring then names the length it cannot split)."""
  if ring_shards <= 1:
    return ContextLayout()
  if length % (2 * ring_shards):
    return ContextLayout(1, f"natural order: {length} positions are not 2 x {ring_shards} equal chunks")
  return ContextLayout(ring_shards, f"zig-zag over {ring_shards} ring devices ({length // (2 * ring_shards)} "
                                    f"positions a chunk)")
