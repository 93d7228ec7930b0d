"""llamavid_jax.parallel and the sharding decisions: the context layout, the run-plan
lines (`describe`), and `fit_spec`'s dropped axes as a decision or an error."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llamavid_jax import decisions, parallel, sharding
from llamavid_jax.models import LlamaVid
from train import step as S


def test_context_layout_is_decided_once_and_inverts():
  ctx = parallel.context_layout(4, 48)
  assert ctx.ring and ctx.n == 4 and ctx.why == "zig-zag over 4 ring devices (6 positions a chunk)"
  x = jnp.arange(2 * 48).reshape(2, 48)
  np.testing.assert_array_equal(ctx.invert(ctx.apply(x)), x)
  np.testing.assert_array_equal(ctx.apply(x)[0], parallel.ring_order(48, 4))
  assert ctx.kv_slots(x) is x
  odd = parallel.context_layout(4, 44)
  assert not odd.ring and odd.why == "natural order: 44 positions are not 2 x 4 equal chunks"
  assert odd.apply(x) is x and odd.kv_slots(x) is None
  assert parallel.context_layout(1, 44).why == "natural order (no ring)"


def test_describe_lists_every_decision_before_compiling(tiny_cfg):
  """The plan lines for a ring run: LLM attention rings, the ViT and the Q-Former do not,
  zig-zag layout, ring placement, frames split; and an odd frame chunk shows as the
  fallback it is."""
  cfg = dataclasses.replace(tiny_cfg, attention_impl="auto", vision_attention_impl="auto", frame_chunk=4)
  batch = S.abstract_batch(cfg, 2, 17, 8, 4, use_features=False)   # S' = 17 - 1 + 8 x 2 = 32
  mesh = sharding.make_mesh({"fsdp": 2, "sequence": 4})
  lines = decisions.describe(cfg, mesh, batch)
  assert lines == [
      "attention llm: auto -> ring (a ring over 4 devices; S=32, T=32, float32)",
      "attention vit: auto -> chunked (one device a sequence; S=5, T=5, float32)",
      "attention qformer: auto -> chunked (one device a sequence; S=8, T=8, float32)",
      "context layout: zig-zag over 4 ring devices (4 positions a chunk)",
      "frame tokens: ring placement over 4 devices (4 tokens, 8 positions a block)",
      "frames: 2 chunks of 4, 1 from each of 4 devices"], lines
  odd = decisions.describe(dataclasses.replace(cfg, frame_chunk=2), mesh, S.abstract_batch(cfg, 2, 19, 8, 4, False))
  assert odd[3:] == [
      "context layout: natural order: 34 positions are not 2 x 4 equal chunks",
      "frame tokens: plain gather (34 positions do not split over 4 devices: the length stays whole on each)",
      "frames: chunks of 2 sliced whole, across devices (frame_chunk=2 does not split over the 4 devices holding "
      "the frames)"], odd


def test_fit_spec_reports_or_refuses_what_it_cannot_split(tiny_cfg):
  """fit_spec used to replicate silently: the dropped axes are listed per parameter
  leaf (and in `describe`), and strict=True raises naming the dim."""
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  spec = sharding.logical_to_spec(("embed", "kv_heads"))
  assert sharding.fit_spec(spec, (8, 2), mesh) == jax.sharding.PartitionSpec(("fsdp", "sequence"), None)
  assert sharding.dropped_axes(spec, (8, 2), mesh) == [(1, ("tensor",))]
  with pytest.raises(ValueError, match=r"dim 1 \(2\) does not split over tensor"):
    sharding.fit_spec(spec, (8, 2), mesh, strict=True)
  model = LlamaVid(tiny_cfg)
  inputs = S.dummy_inputs(tiny_cfg, 2, 6, 2, 4, use_features=True)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))["params"]
  leaves = sharding.replicated_leaves(boxed, mesh)
  assert leaves and all(" not split over " in line for line in leaves), leaves
  with pytest.raises(ValueError, match="does not split over"):
    sharding.param_shardings(boxed, mesh, strict=True)
  batch = S.abstract_batch(tiny_cfg, 2, 6, 2, 4, use_features=True)
  assert decisions.describe(tiny_cfg, mesh, batch, params=boxed)[-1].startswith(f"parameters: {len(leaves)} leaves")


def test_jax_features_are_version_checks_that_fail_loudly(monkeypatch):
  """No getattr probes with silent defaults: an older JAX fails with one line."""
  from llamavid_jax import jax_compat
  assert not jax_compat.in_host_memory(jnp.zeros(2))
  with jax.set_mesh(sharding.make_mesh({"data": 2}, jax.devices()[:2])):
    assert jax_compat.mesh_platform(jax.sharding.get_abstract_mesh()) == "cpu"
  monkeypatch.setattr(jax, "__version__", "0.9.1")
  with pytest.raises(RuntimeError, match=r"needs jax >= 0.10 \(tested 0.10.2\); installed 0.9.1"):
    jax_compat.in_host_memory(jnp.zeros(2))
  with pytest.raises(RuntimeError, match="re-vendor"):
    jax_compat.require_splash_vendored()
