"""Blockwise (`chunked`) and sequence-sharded (`ring`) attention against the fp32
reference: outputs and gradients, with GQA, causality and key padding."""

import dataclasses
import functools
import math
from unittest import mock

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
  f = lambda q, k, v: jnp.sum(A.attention(q, k, v, kv_valid=kv_valid, q_slots=q_slots, impl=impl, **kw) * W(q))
  return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)


def assert_close(got, want, tol=2e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [4, 5])    # 5: keys padded to whole blocks
@pytest.mark.slow
def test_chunked_matches_reference(causal, block, monkeypatch):
  q, k, v, kv_valid, slots = inputs()
  slots = slots if causal else None
  monkeypatch.setitem(A.IMPLS, "chunked", dataclasses.replace(A.IMPLS["chunked"], fn=lambda *a: A.chunked(*a, block=block)))
  assert_close(loss_and_grads("chunked", q, k, v, kv_valid, slots),
               loss_and_grads("reference", q, k, v, kv_valid, slots))
  np.testing.assert_allclose(A.attention(q, k, v, kv_valid=kv_valid, q_slots=slots, impl="xla"),
                             A.attention(q, k, v, kv_valid=kv_valid, q_slots=slots, impl="reference"), atol=1e-5)


def _on_mesh(mesh, q, k, v):
  spec = lambda names: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(names))
  return (jax.device_put(q, spec(("batch", "length", "heads", "kv"))),
          *(jax.device_put(a, spec(("batch", "length", "kv_heads", "kv"))) for a in (k, v)))


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("impl", ["chunked", "ring", "zigzag"])
@pytest.mark.slow
def test_blockwise_ring_and_zigzag_equal_dense_attention(impl, n, padded):
  """n blocks (chunked) or n ring shards over `sequence` (contiguous, or zig-zag: the
  inputs, slots and padding permuted once, the output permuted back), against the fp32
  dense reference: forward <= 5e-5, gradients <= 1e-4; GQA, causal, right padding."""
  s = 32
  q, k, v, kv_valid, slots = inputs(s=s)
  kv_valid = kv_valid if padded else None
  want = loss_and_grads("reference", q, k, v, kv_valid, slots)
  if impl == "chunked":
    f = lambda q, k, v: jnp.sum(A.chunked(q, k, v, kv_valid, slots, None, 8 ** -0.5, block=s // n) * W(q))
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
  else:
    mesh = sharding.make_mesh({"sequence": n}, jax.devices()[:n])
    zz = (lambda x: A.zigzag(x, n)) if impl == "zigzag" else (lambda x: x)
    back = (lambda x: A.zigzag(x, n, inverse=True)) if impl == "zigzag" else (lambda x: x)
    order = zz(slots)
    valid = None if kv_valid is None else zz(kv_valid)

    def f(q, k, v):   # natural-order arguments, as the gradients are compared in that order
      out = A.attention(zz(q), zz(k), zz(v), kv_valid=valid, q_slots=order,
                        kv_slots=order if impl == "zigzag" else None, impl="ring")
      return jnp.sum(back(out) * W(q))

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*_on_mesh(mesh, q, k, v))
  # the loss sums 2048 weighted outputs: fp32 sums in another order (unoptimised XLA:CPU, as
  # the tests compile) differ by up to 1.8e-5
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=5e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def W(q):
  return jnp.asarray(np.random.RandomState(9).randn(*q.shape), jnp.float32)


@pytest.mark.slow
def test_ring_on_meshes_with_other_axes():
  """The ring with the batch or heads also split (data x sequence, sequence x tensor)."""
  q, k, v, kv_valid, slots = inputs(s=32)
  want = loss_and_grads("reference", q, k, v, kv_valid, slots)
  for shape in ({"data": 2, "sequence": 4}, {"sequence": 4, "tensor": 2}):
    mesh = sharding.make_mesh(shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      got = jax.jit(lambda *a: loss_and_grads("ring", *a))(*_on_mesh(mesh, q, k, v), kv_valid, slots)
    assert_close(got, want)


def test_zigzag_layout_and_its_inverse():
  assert A.ring_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]   # device 0: chunks 0, 3; device 1: 1, 2
  assert A.ring_order(12, 3).tolist() == [0, 1, 10, 11, 2, 3, 8, 9, 4, 5, 6, 7]
  x = jnp.arange(2 * 48 * 3).reshape(2, 48, 3)
  np.testing.assert_array_equal(A.zigzag(A.zigzag(x, 4), 4, inverse=True), x)
  with pytest.raises(ValueError, match="not a multiple of 2 x 4"):
    A.zigzag(jnp.zeros((1, 12)), 4)


def test_zigzag_balances_the_rings_causal_work():
  """(query tile, key block) pairs per device at 64K on 8 shards with 512-blocks, by
  the kernel's own skip rule: contiguous chunks give device d (d + 1/2) chunks of
  work (136 .. 1928 blocks); zig-zag gives every device the same 1032, and the total,
  8256 = 128 x 129 / 2 blocks, is the causal minimum in blocks (0.50x dense)."""
  s, n = 65536, 8
  natural = np.arange(s)
  contiguous = A.ring_block_counts(natural, natural, n)
  assert contiguous.tolist() == [136 + 256 * d for d in range(n)]
  order = A.ring_order(s, n)
  balanced = A.ring_block_counts(order, order, n)
  assert balanced.tolist() == [1032] * n
  assert balanced.sum() == contiguous.sum() == 128 * 129 // 2
  assert balanced.sum() / (s // 512) ** 2 <= 0.6


def test_cudnn_arguments_equal_the_reference():
  """`cudnn`'s call (is_causal + sequence lengths, no mask array) run by XLA on CPU:
  right padding uses it, and equals the reference on the real rows; left padding (not
  a prefix) takes the blockwise kernel at run time and equals it everywhere."""
  q, k, v, kv_valid, slots = inputs(s=16)
  cudnn = jax.jit(lambda q, k, v, m: A.cudnn(q, k, v, m, slots, None, 8 ** -0.5, implementation="xla"))
  ref = A.reference(q, k, v, kv_valid, slots, None, 8 ** -0.5)
  rows = np.asarray(kv_valid)[:, :, None, None]
  np.testing.assert_allclose(np.where(rows, cudnn(q, k, v, kv_valid), 0), np.where(rows, ref, 0), atol=1e-5)
  left = kv_valid[:, ::-1]
  np.testing.assert_allclose(cudnn(q, k, v, left), A.reference(q, k, v, left, slots, None, 8 ** -0.5), atol=1e-5)


def test_auto_picks_per_backend_and_the_ring_on_a_split_sequence():
  shape = (1, 1024, 8, 64)
  assert A.auto_impl(shape, shape, True, False, backend="tpu") == "splash"
  assert A.auto_impl(shape, shape, True, False, backend="gpu") == "cudnn"
  assert A.auto_impl(shape, shape, True, False, backend="gpu", dtype=jnp.float32) == "chunked"   # no fp32 cuDNN
  assert A.auto_impl(shape, shape, True, False, backend="cpu") == "chunked"
  assert A.auto_impl(shape, (1, 4096, 8, 64), True, False, backend="gpu") == "chunked"   # a KV cache
  assert A.auto_impl(shape, shape, True, True, backend="tpu") == "chunked"                # explicit slots
  with jax.set_mesh(sharding.make_mesh({"sequence": 2}, jax.devices()[:2])):
    assert A.auto_impl(shape, shape, True, True, backend="tpu") == "splash"   # the splash ring: 256-chunks
    assert A.auto_impl((1, 1280, 8, 64), (1, 1280, 8, 64), True, True, backend="tpu") == "ring"   # 320-chunks
    assert A.auto_impl(shape, shape, True, True, backend="cpu") == "ring"
  q, k, v, kv_valid, slots = inputs()
  np.testing.assert_allclose(A.attention(q, k, v, kv_valid=kv_valid, q_slots=slots, impl="auto"),
                             A.attention(q, k, v, kv_valid=kv_valid, q_slots=slots, impl="reference"), atol=1e-5)


def test_auto_never_rings_the_vit_or_the_qformer():
  """On a mesh that splits the LLM length, `auto` rings the LLM only: the ViT's and the
  Q-Former's sequences are not split (their activations name no `length`), so a ring
  there would reshard them. Their attention on that mesh equals the reference."""
  vit = (4, 257, 16, 88)
  with jax.set_mesh(sharding.make_mesh({"sequence": 4}, jax.devices()[:4])), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    assert A.auto_impl(vit, vit, False, False, backend="cpu", tower="llm") == "ring"
    for tower in ("vit", "qformer"):
      assert A.auto_impl(vit, vit, False, False, backend="cpu", tower=tower) == "chunked"
      assert A.auto_impl(vit, vit, False, False, backend="tpu", tower=tower) == "chunked"
      name, line = A.decide("auto", tower, vit, vit, False, False, jnp.float32)
      assert name == "chunked" and line.startswith(f"attention {tower}: auto -> chunked (one device"), line
      assert A.decide("ring", tower, vit, vit, False, False, jnp.float32)[0] == "chunked"
    assert A.decide("auto", "llm", vit, vit, True, True, jnp.float32)[1].startswith(
        "attention llm: auto -> ring (a ring over 4 devices")
    q, k, v, kv_valid, _ = inputs(s=12)
    got = jax.jit(lambda q, k, v: A.attention(q, k, v, kv_valid=kv_valid, impl="auto", tower="vit"))(q, k, v)
  np.testing.assert_allclose(got, A.reference(q, k, v, kv_valid, None, None, 8 ** -0.5), atol=1e-5)


def test_registry_declares_what_each_impl_supports():
  assert A.IMPLS["cudnn"].backends == ("gpu",) and not A.IMPLS["cudnn"].kv_cache
  assert A.IMPLS["splash"].backends == ("tpu",) and A.IMPLS["splash"].ring
  assert A.RING_IMPLS == ("ring", "splash", "auto")
  with pytest.raises(ValueError, match="attention tower 'llama'"):
    A.decide("xla", "llama", (1, 4, 2, 8), (1, 4, 2, 8), True, False, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [{"data": 2, "sequence": 4}])
def test_splash_ring_equals_the_reference_in_the_pallas_interpreter(mesh_shape):
  """Splash inside the ring's shard_map (Pallas' interpreter on CPU): the zig-zag
  training layout, chunks of 128, GQA, one row right-padded past a chunk; forward and
  gradients against the dense fp32 reference on the real rows. A layout that is not
  the zig-zag one (natural order on the ring) takes the blockwise steps at run time."""
  n = mesh_shape["sequence"]
  b, s, h, kh, d = 2, 2 * n * 128, 4, 2, 64
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, s, m, d)), jnp.float32) for m in (h, kh, kh))
  valid = jnp.asarray(np.arange(s)[None] < np.array([[s], [s - 200]]))
  slots = jnp.broadcast_to(jnp.arange(s), (b, s))
  keep = np.asarray(valid)[:, :, None, None]
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  zz, back = (lambda x: A.zigzag(x, n)), (lambda x: A.zigzag(x, n, inverse=True))

  def ring(q, k, v, order=True):
    f = zz if order else (lambda x: x)
    out = A.attention(f(q), f(k), f(v), kv_valid=f(valid), q_slots=f(slots), kv_slots=f(slots), impl="splash")
    return back(out) if order else out

  loss = lambda f: jax.value_and_grad(lambda *x: jnp.sum(jnp.where(keep, f(*x), 0) * w), argnums=(0, 1, 2))
  want = loss(lambda q, k, v: A.reference(q, k, v, valid, slots, None, d ** -0.5))(q, k, v)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape.values())])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), mock.patch.dict(
      A.IMPLS, splash=dataclasses.replace(A.IMPLS["splash"], fn=functools.partial(A.splash, interpret=True))):
    got = jax.jit(loss(ring))(*_on_mesh(mesh, q, k, v))
    out, natural = (jax.jit(lambda *x: ring(*x, order=o))(*_on_mesh(mesh, q, k, v)) for o in (True, False))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)
  ref = lambda m: A.reference(q, k, v, m, slots, None, d ** -0.5)
  # which kernels ran shows on the padding rows: splash's segment ids let a padded query
  # see the padded keys, the blockwise kernel the real ones
  np.testing.assert_allclose(np.where(keep, 0, out), np.where(keep, 0, ref(~valid)), atol=1e-5)
  np.testing.assert_allclose(natural, ref(valid), atol=1e-5)


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
  splash = lambda q, k, v: A.splash(q, k, v, valid, slots, None, d ** -0.5, block=128, interpret=True)
  ref = lambda q, k, v: A.reference(q, k, v, valid, slots, None, d ** -0.5)
  np.testing.assert_allclose(np.where(keep, splash(q, k, v), 0), np.where(keep, ref(q, k, v), 0), atol=2e-6)
  loss = lambda f: jax.grad(lambda *x: jnp.sum(jnp.where(keep, f(*x), 0) ** 2), argnums=(0, 1, 2))
  for a, r in zip(loss(splash)(q, k, v), loss(ref)(q, k, v)):
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="causal self-attention"):
    A.splash(q, k, v, valid, None, None, 1.0, interpret=True)
