"""Frames from host memory to the devices, a chunk at a time.

Long-video features can stay in host memory (`train.step.Trainer(host_inputs=...)`); the
model reads them through a fetcher `fetch(features, chunk) -> (get(i) -> float[B, chunk,
...] on the device, G)`, whose default (the model's) slices frames i * chunk .. and moves
nothing. `fetch_frames` here also moves host-resident slices to the device and, with the
frame axis split over G devices (logical `frames`), lets each device slice its part of
chunk i out of its own block.
"""

from __future__ import annotations

import logging

import jax
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from llamavid_jax import jax_compat, sharding
from llamavid_jax.parallel.layout import Decision

log = logging.getLogger(__name__)


def to_device(x):
  """x itself, or its copy in device memory where it lives in host memory."""
  if jax_compat.in_host_memory(x):
    return jax.device_put(x, jax.memory.Space.Device)
  return x


def _spec(mesh, shape):
  rules = nn.get_logical_axis_rules() or sharding.LOGICAL_RULES
  return sharding.fit_spec(sharding.logical_to_spec(("batch", "frames") + (None,) * (len(shape) - 2), rules),
                           shape, mesh)


def fetch_decision(mesh, shape, chunk: int) -> Decision:
  """How chunks of `chunk` frames of features of `shape` [B, T, ...] reach the devices:
  kind "whole" (one slice), "split" (each device its part) or the fallback "one-shard"."""
  t = shape[1]
  if not chunk or chunk >= t:
    return Decision("whole", f"frames: all {t} at once")
  if mesh is None or mesh.empty:
    return Decision("whole", f"frames: {t // chunk} chunks of {chunk}")
  g = sharding.shards(mesh, _spec(mesh, shape)[1])
  if g == 1:
    return Decision("whole", f"frames: {t // chunk} chunks of {chunk} (the frame axis is not split)")
  if chunk % g:
    return Decision("one-shard", f"frames: chunks of {chunk} sliced whole, across devices (frame_chunk={chunk} "
                                 f"does not split over the {g} devices holding the frames)")
  return Decision("split", f"frames: {t // chunk} chunks of {chunk}, {chunk // g} from each of {g} devices")


def frame_fetcher(strict: bool = True):
  """-> fetch(features, chunk) -> (get(i), G) for `LlamaVid.encode_visual`. Where a chunk
  does not split over the devices holding the frames: strict raises ValueError, else the
  whole-chunk slice (G = 1), logged as a decision."""

  def fetch(features, chunk: int):
    mesh = jax.sharding.get_abstract_mesh()
    whole = lambda i: to_device(jax.lax.dynamic_slice_in_dim(features, i * chunk, chunk, axis=1))
    decision = fetch_decision(None if mesh.empty else mesh, features.shape, chunk)
    if decision.kind == "one-shard":
      if strict:
        raise ValueError(f"{decision.why}; choose a frame_chunk that splits, or frame_fetcher(strict=False)")
      log.warning("%s", decision.why)
    if decision.kind != "split":
      return whole, 1
    spec = _spec(mesh, features.shape)
    g = sharding.shards(mesh, spec[1])
    c = chunk // g
    local = lambda x, i: to_device(jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1))
    get = jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False)
    return (lambda i: get(features, i)), g

  return fetch
