"""Blockwise (`chunked`) and sequence-sharded (`ring`) attention against the fp32
reference: outputs and gradients, with GQA, causality and key padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llamavid_jax import sharding
from llamavid_jax.models import LlamaVid
from llamavid_jax.ops import attention as A


def inputs(b=2, s=16, h=4, kh=2, d=8, seed=0):
  rng = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rng.randn(b, s, n, d), jnp.float32) for n in (h, kh, kh))
  kv_valid = jnp.asarray(np.arange(s)[None] < np.array([[s], [s - 5]]))    # sample 1 right-padded
  return q, k, v, kv_valid, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def loss_and_grads(impl, q, k, v, kv_valid, q_slots, **kw):
  w = jnp.asarray(np.random.RandomState(9).randn(*q.shape), jnp.float32)
  f = lambda q, k, v: jnp.sum(A.attention(q, k, v, kv_valid=kv_valid, q_slots=q_slots, impl=impl, **kw) * w)
  return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)


def assert_close(got, want, tol=2e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [4, 5])    # 5: keys padded to whole blocks
def test_chunked_matches_reference(causal, block, monkeypatch):
  q, k, v, kv_valid, slots = inputs()
  slots = slots if causal else None
  monkeypatch.setattr(A, "BLOCK", block)
  monkeypatch.setitem(A.IMPLS, "chunked", lambda *a: A._chunked(*a, block=block))
  assert_close(loss_and_grads("chunked", q, k, v, kv_valid, slots),
               loss_and_grads("reference", q, k, v, kv_valid, slots))
  np.testing.assert_allclose(A.attention(q, k, v, kv_valid=kv_valid, q_slots=slots, impl="xla"),
                             A.attention(q, k, v, kv_valid=kv_valid, q_slots=slots, impl="reference"), atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [{"sequence": 8}, {"data": 2, "sequence": 4}, {"sequence": 4, "tensor": 2}])
def test_ring_matches_reference_on_a_mesh(mesh_shape):
  q, k, v, kv_valid, slots = inputs(s=32)
  want = loss_and_grads("reference", q, k, v, kv_valid, slots)
  mesh = sharding.make_mesh(mesh_shape)
  spec = lambda names: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(names))
  q = jax.device_put(q, spec(("batch", "length", "heads", "kv")))
  k, v = (jax.device_put(a, spec(("batch", "length", "kv_heads", "kv"))) for a in (k, v))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    got = jax.jit(lambda *a: loss_and_grads("ring", *a))(q, k, v, kv_valid, slots)
  assert_close(got, want)


@pytest.mark.slow
def test_llamavid_with_ring_attention_equals_xla(tiny_cfg):
  """The whole model on a (fsdp 2, sequence 4) mesh with ring attention in the LLM."""
  cfg = dataclasses.replace(tiny_cfg, attention_impl="ring")
  rng = np.random.RandomState(0)
  b, s, t = 2, 11, 3                      # S' = 11 - 1 + 3 * 2 = 16 = 4 chunks of 4
  ids = rng.randint(3, cfg.llm.vocab_size, (b, s)).astype(np.int32)
  ids[:, 2] = cfg.image_token_id
  batch = dict(input_ids=ids, text_mask=np.arange(s)[None] < np.array([[s], [9]]),
               frame_mask=np.ones((b, t), bool), qformer_ids=np.ones((b, 4), np.int32),
               qformer_mask=np.ones((b, 4), bool), frames=rng.randn(b, t, 28, 28, 3).astype(np.float32))
  model = LlamaVid(tiny_cfg)
  params = model.init(jax.random.key(0), **batch)["params"]
  want, _ = model.apply(params and {"params": params}, **batch)
  mesh = sharding.make_mesh({"fsdp": 2, "sequence": 4})
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    got, _ = jax.jit(LlamaVid(cfg).apply)({"params": params}, **batch)
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.slow
def test_splash_matches_reference_in_the_pallas_interpreter():
  """The TPU splash kernel (run by Pallas' interpreter on CPU): causal GQA with padded
  keys, forward and gradients, on the rows that are not padding."""
  b, s, h, kh, d = 2, 256, 4, 2, 64
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for n in (h, kh, kh))
  valid = jnp.asarray(np.arange(s)[None] < np.array([[s], [s - 100]]))
  slots = jnp.broadcast_to(jnp.arange(s), (b, s))
  keep = np.asarray(valid)[:, :, None, None]
  splash = lambda q, k, v: A._splash(q, k, v, valid, slots, d ** -0.5, block=128, interpret=True)
  ref = lambda q, k, v: A._reference(q, k, v, valid, slots, d ** -0.5)
  np.testing.assert_allclose(np.where(keep, splash(q, k, v), 0), np.where(keep, ref(q, k, v), 0), atol=2e-6)
  loss = lambda f: jax.grad(lambda *x: jnp.sum(jnp.where(keep, f(*x), 0) ** 2), argnums=(0, 1, 2))
  for a, r in zip(loss(splash)(q, k, v), loss(ref)(q, k, v)):
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="causal self-attention"):
    A._splash(q, k, v, valid, None, 1.0, interpret=True)
