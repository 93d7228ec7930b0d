"""Long sequences: the loss in sequence chunks equals the plain loss, and the blockwise
attention's memory stays linear in the sequence under the scanned layers."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamavid_jax.models import LlamaVid
from llamavid_jax.models.config import LlmConfig
from llamavid_jax.models.llama import Llama
from train import step as S
from train.toy_data import ToyBatches


@pytest.mark.slow
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(tiny_cfg):
  model = LlamaVid(tiny_cfg)
  batch = next(ToyBatches(tiny_cfg, 2, 20, 3, 6, True))                # precomputed features: no ViT to compile
  batch = {k: v for k, v in batch.items() if k != "sample_index"}
  params = jax.jit(model.init)(jax.random.key(0), **{k: v for k, v in batch.items() if k in S.MODEL_INPUTS})["params"]
  grad = lambda chunk: jax.jit(jax.value_and_grad(lambda p: S.loss_sums(model, p, batch, chunk), has_aux=True))
  ((s0, n0), g0), ((s1, n1), g1) = grad(S.LOSS_CHUNK)(params), grad(8)(params)   # S' = 25: 3 chunks + pad
  assert n0 == n1 > 0
  np.testing.assert_allclose(s1, s0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def temporaries(seq_len: int) -> int:
  """XLA temporaries of one forward + backward of a 2-layer, width-128 chunked LLM."""
  cfg = LlmConfig(vocab_size=64, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=256)
  m = Llama(cfg, attention_impl="chunked")
  small = (jnp.zeros((1, 8, 128)), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))
  params = jax.eval_shape(lambda: m.init(jax.random.key(0), *small))["params"]
  x = jax.ShapeDtypeStruct((1, seq_len, 128), jnp.float32)
  pos, valid = jax.ShapeDtypeStruct((1, seq_len), jnp.int32), jax.ShapeDtypeStruct((1, seq_len), jnp.bool_)
  loss = lambda p, x, pos, valid: jnp.sum(m.apply({"params": p}, x, pos, pos, valid)[0])
  return jax.jit(jax.grad(loss)).lower(params, x, pos, valid).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_blockwise_attention_memory_is_linear_under_scanned_layers():
  """Doubling the sequence at most doubles the temporaries (+5 %): the block masks used
  to be stacked per key block as scan residuals, an [S, T] buffer (x2.9 per doubling)."""
  a, b = temporaries(2048), temporaries(4096)
  assert b <= 2.1 * a, (a, b)


@pytest.mark.slow
def test_offloaded_layer_inputs_give_the_gradients_of_full_remat():
  """remat_policy "offload_layer_inputs" only moves where each layer's input waits for
  the backward (host memory where the backend has it; CPU's host is its device)."""
  from llamavid_jax.models.layers import REMAT_POLICIES
  cfg = LlmConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=64)
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  pos, valid = jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.ones((2, 16), bool)
  grads = []
  for policy in ("nothing_saveable", "offload_layer_inputs"):
    m = Llama(cfg, remat_policy=policy, attention_impl="chunked")
    p = m.init(jax.random.key(0), x, pos, pos, valid)["params"]
    loss = lambda p, x: jnp.sum(m.apply({"params": p}, x, pos, pos, valid)[0] ** 2)
    grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x))
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  assert "offload_layer_inputs" in REMAT_POLICIES
  with pytest.raises(ValueError, match="remat_policy 'offload_everything'"):
    Llama(cfg, remat_policy="offload_everything").init(jax.random.key(0), x, pos, pos, valid)


def _placement_inputs(cfg, mode, rng):
  """Model inputs whose frame tokens land on a split LLM length: `one` placeholder (K =
  32, S' = 36), `two` placeholders (P = 2: every block visited), `movie` (64 frames,
  placeholders among subtitles: S' = 144, blocks of 16 / 18 on 8 devices, so 7 rounds
  of the ring suffice), with left/right padding and padding frames."""
  v = cfg.vision
  if mode == "movie":
    b, s, t = 2, 80, 64
    ids = np.zeros((b, s), np.int32)
    text_mask = np.zeros((b, s), bool)
    for row, (frames, subs) in enumerate([(64, 8), (50, 5)]):
      r = [1, 5]
      for f in range(frames):
        r += [cfg.image_token_id] + list(rng.integers(3, cfg.llm.vocab_size, int(f < subs)))
      r += list(rng.integers(3, cfg.llm.vocab_size, s - frames - subs - 2 - 3 * row))
      ids[row, :len(r)], text_mask[row, :len(r)] = r, True
    frame_mask = np.arange(t)[None] < np.array([[64], [50]])
    n, width = cfg.feature_shape
    q = rng.integers(1, cfg.qformer.vocab_size, (b, 6)).astype(np.int32)
    return dict(input_ids=ids, text_mask=text_mask, frame_mask=frame_mask, qformer_ids=q,
                qformer_mask=np.ones((b, 6), bool), features=rng.standard_normal((b, t, n, width)).astype(np.float32))
  b, s, t = 4, 5, 16
  ids = rng.integers(3, cfg.llm.vocab_size, (b, s)).astype(np.int32)
  ids[np.arange(b), [0, 1, 2, 4]] = cfg.image_token_id     # the placeholder anywhere in the text
  q = rng.integers(1, cfg.qformer.vocab_size, (b, 6)).astype(np.int32)
  if mode == "two":
    ids[np.arange(b), [3, 4, 0, 1]] = cfg.image_token_id   # a second one, before or after the first
    q = np.stack([q, q[::-1]], axis=1)                     # [B, P = 2, L]
  text_mask = np.ones((b, s), bool)
  text_mask[3, :2] = False                                 # left padding
  frame_mask = np.arange(t)[None] < np.array([[16], [12], [16], [9]])
  return dict(input_ids=ids, text_mask=text_mask, frame_mask=frame_mask, qformer_ids=q,
              qformer_mask=np.ones(q.shape, bool),
              features=rng.standard_normal((b, t, v.num_tokens, v.width)).astype(np.float32))


@pytest.mark.parametrize("mode,mesh_shape", [("two", {"fsdp": 2, "sequence": 4}), ("movie", {"fsdp": 1, "sequence": 8})])
@pytest.mark.slow
def test_frame_tokens_placed_round_the_ring_equal_the_gather(tiny_cfg, mode, mesh_shape):
  """With the LLM length split over `sequence`, the frame tokens reach their positions
  by blocks sent round the ring (no all-gather of the K frame tokens): the spliced
  embeddings are those of the plain one-device gather. (One placeholder: the ring
  training step in tests/test_train_step.py.)"""
  import dataclasses
  from flax import linen as nn
  from llamavid_jax import sharding
  cfg = dataclasses.replace(tiny_cfg, frame_chunk=mesh_shape["sequence"], video_mode="movie" if mode == "movie" else "clip")
  model = LlamaVid(cfg)
  inputs = _placement_inputs(cfg, mode, np.random.default_rng(0))
  params = jax.jit(model.init)(jax.random.key(0), **inputs)["params"]
  from llamavid_jax import parallel
  embed = jax.jit(lambda p, x: model.apply({"params": p}, **x, place=parallel.ring_placement(),
                                           fetch=parallel.frame_fetcher(), method=LlamaVid.embed_inputs)[0])
  want = embed(params, inputs)
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    lowered = embed.lower(params, inputs)
    got = embed(params, inputs)
  assert "collective-permute" in lowered.compile().as_text()   # the ring, not the gather
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_former_silent_fallbacks_are_errors_or_printed_decisions(caplog):
  """Where the frame-token blocks or the frame chunks do not split over the devices, the
  strict placement and fetcher raise; the lenient ones log the decision; `describe`
  names it before anything compiles."""
  from flax import linen as nn
  from llamavid_jax import parallel, sharding
  mesh = sharding.make_mesh({"sequence": 4}, jax.devices()[:4])
  flat, src = jnp.zeros((1, 6, 2)), jnp.zeros((1, 8), jnp.int32)            # K = 6 tokens: not 4 blocks
  feats = jnp.zeros((1, 8, 3, 2))                                           # T = 8 frames, chunks of 2 on 4
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    with pytest.raises(ValueError, match="ALL-GATHER of 6 tokens on each of 4 devices"):
      parallel.ring_placement()(flat, src, text_len=2, monotone=True)
    with pytest.raises(ValueError, match="frame_chunk=2 does not split over the 4 devices"):
      parallel.frame_fetcher()(feats, 2)
    with caplog.at_level("WARNING"):
      assert parallel.ring_placement(strict=False)(flat, src, text_len=2, monotone=True).shape == (1, 8, 2)
      assert parallel.frame_fetcher(strict=False)(feats, 2)[1] == 1
  assert "ALL-GATHER" in caplog.text and "frame_chunk=2" in caplog.text
  assert parallel.placement_decision(mesh, 1, 8, 8).kind == "ring"
  assert parallel.fetch_decision(mesh, feats.shape, 4).kind == "split"


def test_ring_placement_reaches_the_farthest_source_in_the_fewest_rounds():
  """A monotone placement at its extreme (src[p] = p - S + 1: the most text before the
  frame tokens that S text positions allow) over 8 devices, K = 128 sources, S' = 144,
  S = 17: ring_rounds' 3 rounds reach every source (the result and its gradient, the
  reverse ring's, are the gather's), and 3 is the least: with 2 the farthest positions
  keep zeros. A placement in no order takes all 8 rounds."""
  from flax import linen as nn
  from llamavid_jax import sharding
  from llamavid_jax.parallel import placement
  g, k, s_out, text = 8, 128, 144, 17
  assert placement.ring_rounds(g, k // g, s_out // g, text) == 3
  rng = np.random.default_rng(0)
  flat = rng.standard_normal((2, k, 4)).astype(np.float32)
  p = np.arange(s_out)
  src = np.stack([np.clip(p - text + 1, 0, k - 1), np.clip(p - rng.integers(0, text, s_out), 0, k - 1)])
  src = np.maximum.accumulate(src, axis=1).astype(np.int32)            # monotone, p - S < src <= p
  want = np.take_along_axis(flat, src[..., None], 1)
  w = rng.standard_normal(want.shape).astype(np.float32)
  grad = lambda place: jax.jit(jax.grad(lambda f: jnp.sum(place(f) * w)))(flat)
  want_grad = grad(lambda f: jnp.take_along_axis(f, src[..., None], 1))
  mesh = sharding.make_mesh({"sequence": g})
  for rounds, equal in ((3, True), (2, False)):
    with mock.patch.object(placement, "ring_rounds", lambda *a: rounds), jax.set_mesh(mesh), \
         nn.logical_axis_rules(sharding.LOGICAL_RULES):
      place = lambda f: placement.ring_placement()(f, src, text_len=text, monotone=True)
      got, got_grad = np.asarray(jax.jit(place)(flat)), np.asarray(grad(place))
    assert np.array_equal(got, want) == equal
    assert np.allclose(got_grad, want_grad, atol=1e-6) == equal
  anywhere = rng.integers(0, k, (2, s_out)).astype(np.int32)         # not monotone: all 8 rounds
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    place = lambda f: placement.ring_placement()(f, anywhere, text_len=text, monotone=False)
    np.testing.assert_array_equal(jax.jit(place)(flat), np.take_along_axis(flat, anywhere[..., None], 1))
    np.testing.assert_allclose(grad(place), grad(lambda f: jnp.take_along_axis(f, anywhere[..., None], 1)),
                               atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 2, "sequence": 4}])
@pytest.mark.slow
def test_mlp_in_sequence_chunks_equals_the_whole_mlp(mesh_shape):
  """mlp_chunk: the same parameters (tree and values) and the same outputs and
  gradients as the whole-sequence MLP, one device or the sequence split over 4 (S = 44:
  11 positions a shard, chunks of 4, so 1 padded position a shard)."""
  from flax import linen as nn
  from llamavid_jax import sharding
  cfg = LlmConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
  rng = np.random.default_rng(0)
  s = 44
  x = jnp.asarray(rng.standard_normal((2, s, 32)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
  valid = jnp.ones((2, s), bool)
  whole, chunked = Llama(cfg, attention_impl="chunked"), Llama(cfg, attention_impl="chunked", mlp_chunk=4)
  params = whole.init(jax.random.key(0), x, pos, pos, valid)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(chunked.init(jax.random.key(0), x, pos, pos, valid)["params"])
  np.testing.assert_array_equal(jax.tree.leaves(params)[0],
                                jax.tree.leaves(chunked.init(jax.random.key(0), x, pos, pos, valid)["params"])[0])
  w = jnp.asarray(rng.standard_normal((2, s, 32)), jnp.float32)

  def value_and_grad(m):
    f = lambda p, x: jnp.sum(m.apply({"params": p}, x, pos, pos, valid)[0] * w)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)

  want = value_and_grad(whole)
  if mesh_shape is None:
    got = value_and_grad(chunked)
  else:
    with jax.set_mesh(sharding.make_mesh(mesh_shape)), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      got = value_and_grad(chunked)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
