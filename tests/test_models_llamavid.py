"""The whole model: splicing, padding frames, token counts, gradients, logical axes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llamavid_jax import sharding
from llamavid_jax.models import LlamaVid, splice_labels
from configs import tiny
from llamavid_jax.models import config as C

B, S, L = 2, 10, 6


def make_batch(cfg, t, rng, placeholder_at=(3, 5), valid_frames=None, size=None):
  size = size or cfg.vision.image_size
  ids = rng.randint(3, cfg.llm.vocab_size, (B, S)).astype(np.int32)
  for b, p in enumerate(placeholder_at):
    if p is not None:
      ids[b, p] = cfg.image_token_id
  text_mask = np.ones((B, S), bool)
  text_mask[1, 8:] = False
  frame_mask = np.ones((B, t), bool)
  for b, n in enumerate(valid_frames or []):
    frame_mask[b, n:] = False
  return dict(input_ids=ids, text_mask=text_mask, frame_mask=frame_mask,
              qformer_ids=rng.randint(1, cfg.qformer.vocab_size, (B, L)).astype(np.int32),
              qformer_mask=np.arange(L)[None] < np.array([[L], [4]]),
              frames=rng.randn(B, t, size, size, 3).astype(np.float32))


@pytest.fixture(scope="module")
def video(tiny_cfg):
  model = LlamaVid(tiny_cfg)
  batch = make_batch(tiny_cfg, 3, np.random.RandomState(0), valid_frames=[3, 2])
  params = nn.unbox(model.init(jax.random.key(0), **batch)["params"])
  return model, params, batch


@pytest.mark.slow
def test_video_logits_have_two_tokens_per_frame(video, tiny_cfg):
  model, params, batch = video
  logits, out = jax.jit(model.apply)({"params": params}, **batch)
  assert tiny_cfg.tokens_per_frame == 2
  assert logits.shape == (B, S - 1 + 3 * 2, tiny_cfg.llm.vocab_size)
  # sample 0: 3 frames -> 6 visual tokens at positions 3..8; sample 1: 2 valid frames
  # -> 4 visual tokens at 5..8, and its 2 padded text tokens + 2 unused slots are padding.
  lay = out["layout"]
  np.testing.assert_array_equal(np.where(lay.is_vis[0])[0], np.arange(3, 9))
  np.testing.assert_array_equal(np.where(lay.is_vis[1])[0], np.arange(5, 9))
  assert lay.valid[0].sum() == S - 1 + 6 and lay.valid[1].sum() == 8 - 1 + 4
  assert out["context_attention"].shape == (B, 1, 3, tiny_cfg.qformer.num_query, tiny_cfg.vision.grid**2)
  np.testing.assert_allclose(out["context_attention"].sum(-1), 1.0, rtol=1e-5)
  labels = np.arange(S)[None].repeat(B, 0).astype(np.int32)
  spliced = np.asarray(splice_labels(jnp.asarray(labels), lay))
  np.testing.assert_array_equal(spliced[0], [0, 1, 2] + [-100] * 6 + [4, 5, 6, 7, 8, 9])
  np.testing.assert_array_equal(spliced[1], [0, 1, 2, 3, 4] + [-100] * 4 + [6, 7] + [-100] * 4)


def test_splice_matches_python_loop_reference(video, tiny_cfg):
  """The gather-based splice equals the release's per-sample concatenation."""
  model, params, batch = video
  x, lay, _ = model.apply({"params": params}, **batch, method=LlamaVid.embed_inputs)
  vis, _ = model.apply({"params": params}, batch["frame_mask"], batch["qformer_ids"], batch["qformer_mask"],
                       batch["frames"], method=LlamaVid.encode_visual)
  emb = np.asarray(params["llm"]["embed_tokens"]["embedding"])
  for b in range(B):
    ids = batch["input_ids"][b][batch["text_mask"][b]]
    p = int(np.where(ids == -200)[0][0])
    nv = batch["frame_mask"][b].sum() * 2
    want = np.concatenate([emb[ids[:p]], np.asarray(vis[b, 0, :nv]), emb[ids[p + 1:]]])
    np.testing.assert_allclose(np.asarray(x[b, :len(want)]), want, atol=1e-6)
    assert not np.asarray(x[b, len(want):]).any()


@pytest.mark.slow
def test_one_placeholder_per_turn_each_with_its_own_instruction(video, tiny_cfg):
  """imgsp_v1: every human turn has an <image> and its own Q-Former instruction; the
  r-th placeholder gets the frame tokens made with the r-th instruction. Sample 0 has
  three placeholders, sample 1 one (its second and third instruction slots unused)."""
  model, params, batch = video
  tg = dict(params["token_gen"])     # sharpen the context attention (near uniform at init)
  for name in ("vlm_att_projector", "vlm_att_key_projector"):
    tg[name] = dict(tg[name], kernel=tg[name]["kernel"] * 5)
  params = dict(params, token_gen=tg)
  rng = np.random.RandomState(5)
  ids = rng.randint(3, tiny_cfg.llm.vocab_size, (B, 12)).astype(np.int32)
  ids[0, [1, 5, 9]] = -200
  ids[1, 4] = -200
  text_mask = np.ones((B, 12), bool)
  text_mask[1, 10:] = False
  qids = rng.randint(1, tiny_cfg.qformer.vocab_size, (B, 3, L)).astype(np.int32)
  qmask = np.ones((B, 3, L), bool)
  qmask[0, 1, 4:] = False
  multi = dict(batch, input_ids=ids, text_mask=text_mask, qformer_ids=qids, qformer_mask=qmask)
  x, lay, _ = model.apply({"params": params}, **multi, method=LlamaVid.embed_inputs)
  assert x.shape[1] == 12 + 3 * (3 * 2 - 1)
  vis, w = model.apply({"params": params}, multi["frame_mask"], qids, qmask, multi["frames"],
                       method=LlamaVid.encode_visual)
  assert vis.shape == (B, 3, 6, tiny_cfg.llm.d_model) and w.shape[:3] == (B, 3, 3)
  vis = np.asarray(vis)
  assert np.abs(vis[0, 0, 0] - vis[0, 1, 0]).max() > 1e-4      # context tokens follow the instruction
  np.testing.assert_array_equal(vis[0, 0, 1::2], vis[0, 1, 1::2])  # content tokens do not
  emb = np.asarray(params["llm"]["embed_tokens"]["embedding"])
  for b in range(B):
    nv, pieces, r = int(multi["frame_mask"][b].sum()) * 2, [], 0
    for tok in ids[b][text_mask[b]]:
      if tok == -200:
        pieces.append(vis[b, r, :nv]); r += 1
      else:
        pieces.append(emb[tok][None])
    want = np.concatenate(pieces)
    np.testing.assert_allclose(np.asarray(x[b, :len(want)]), want, atol=1e-6)
    assert int(lay.valid[b].sum()) == len(want) and not np.asarray(x[b, len(want):]).any()


@pytest.mark.slow
def test_content_only_gives_every_placeholder_the_same_frame_tokens(tiny_cfg):
  """use_context_token=False with several placeholders (imgsp_v1 multi-turn): each
  placeholder gets the frames' content tokens (the instructions do not matter)."""
  cfg = dataclasses.replace(tiny_cfg, use_context_token=False)
  model = LlamaVid(cfg)
  rng = np.random.RandomState(6)
  batch = make_batch(cfg, 3, rng, valid_frames=[3, 2])
  ids = rng.randint(3, cfg.llm.vocab_size, (B, 12)).astype(np.int32)
  ids[0, [1, 5, 9]] = -200
  ids[1, 4] = -200
  qids = rng.randint(1, cfg.qformer.vocab_size, (B, 3, L)).astype(np.int32)
  multi = dict(batch, input_ids=ids, text_mask=np.ones((B, 12), bool), qformer_ids=qids,
               qformer_mask=np.ones((B, 3, L), bool))
  params = nn.unbox(model.init(jax.random.key(0), **multi)["params"])
  x, lay, _ = model.apply({"params": params}, **multi, method=LlamaVid.embed_inputs)
  vis, _ = model.apply({"params": params}, batch["frame_mask"], qids[:, :1], multi["qformer_mask"][:, :1],
                       batch["frames"], method=LlamaVid.encode_visual)
  vis, emb = np.asarray(vis), np.asarray(params["llm"]["embed_tokens"]["embedding"])
  for b in range(B):
    nv = int(batch["frame_mask"][b].sum())
    want = np.concatenate([vis[b, 0, :nv] if t == -200 else emb[t][None] for t in ids[b]])
    np.testing.assert_allclose(np.asarray(x[b, :len(want)]), want, atol=1e-6)
  logits, _ = model.apply({"params": params}, **multi)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow
def test_padding_frames_do_not_change_the_answer(video, tiny_cfg):
  """Sample 1 (2 valid of 3 frames) gives the same logits as alone with T=2."""
  model, params, batch = video
  logits, out = model.apply({"params": params}, **batch)
  alone = {k: v[1:] for k, v in batch.items()}
  alone["frame_mask"] = alone["frame_mask"][:, :2]
  alone["frames"] = alone["frames"][:, :2]
  logits2, out2 = model.apply({"params": params}, **alone)
  n = int(out2["layout"].valid[0].sum())
  np.testing.assert_allclose(logits[1, :n], logits2[0, :n], atol=1e-5)


@pytest.mark.slow
def test_image_without_compression_gives_one_plus_grid_tokens():
  cfg = tiny.model_config("image")
  model = LlamaVid(cfg)
  batch = make_batch(cfg, 1, np.random.RandomState(1))
  params = model.init(jax.random.key(0), **batch)["params"]
  logits, out = model.apply({"params": params}, **batch)
  assert cfg.tokens_per_frame == 1 + cfg.vision.grid**2 == 5
  assert logits.shape == (B, S - 1 + 5, cfg.llm.vocab_size)


def test_compress_types_come_from_one_registry_entry():
  """Parsing, tokens per frame and pooling come from the same `COMPRESSIONS` entry (a
  grid that does not divide G pools as torch's floor mode: grid:5 on 24x24 is 6x6); a
  bad name fails at config time, listing the registered ones."""
  from llamavid_jax.models import token_gen as TG
  assert TG.compression("grid:4") == (TG.COMPRESSIONS["grid"], 4)
  for name, side, k in (("mean", 16, 1), ("grid:4", 16, 16), ("grid:5", 24, 36), ("none", 16, 256)):
    assert TG.content_tokens(name, side) == k == TG.pool_content(jnp.zeros((1, side * side, 1)), name).shape[1]
  vision = C.VisionConfig(image_size=336, patch_size=14)
  assert C.LlamaVidConfig(vision=vision, compress_type="grid:5").tokens_per_frame == 37
  for bad in ("avg", "grid", "grid:x", "mean:2"):
    with pytest.raises(ValueError, match=r"expected one of \['grid:N', 'mean', 'none'\]"):
      C.LlamaVidConfig(compress_type=bad)
  with pytest.raises(ValueError, match="'grid:1' on a 16x16 patch grid"):
    C.LlamaVidConfig(compress_type="grid:1")
  with pytest.raises(ValueError, match=r"expected one of \['linear', 'mlp2x_gelu'\]"):
    C.LlamaVidConfig(mm_projector_type="mlp3x_relu")


def test_text_only_sample_next_to_a_video_sample(video, tiny_cfg):
  model, params, batch = video
  batch = dict(batch, input_ids=batch["input_ids"].copy())
  batch["input_ids"][1, 5] = 7          # no placeholder: a text-only sample
  logits, out = model.apply({"params": params}, **batch)
  assert not out["layout"].is_vis[1].any() and out["layout"].valid[1].sum() == 8
  ids = batch["input_ids"][1:, :8]
  text_only = dict(input_ids=ids, text_mask=np.ones_like(ids, bool), frame_mask=np.zeros((1, 0), bool),
                   qformer_ids=batch["qformer_ids"][1:], qformer_mask=batch["qformer_mask"][1:],
                   features=np.zeros((1, 0, 5, tiny_cfg.mm_hidden), np.float32))
  logits2, _ = model.apply({"params": params}, **text_only)
  np.testing.assert_allclose(logits[1, :8], logits2[0], atol=1e-5)


@pytest.mark.slow
def test_gradient_reaches_every_trained_part(video, tiny_cfg):
  """Non-zero gradient in every leaf (every layer slice) the release trains; zero in the
  frozen ViT. The one exception, as in the release: the Q-Former's last layer's text
  FFN, whose outputs are discarded (only query positions leave the Q-Former)."""
  model, params, batch = video
  labels = np.where(batch["text_mask"], batch["input_ids"], -100).clip(-100)

  def loss(p):
    logits, out = model.apply({"params": p}, **batch)
    y = splice_labels(jnp.asarray(labels), out["layout"])[:, 1:]
    lp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(lp, jnp.maximum(y, 0)[..., None], -1)[..., 0]
    return jnp.sum(nll * (y >= 0)) / jnp.sum(y >= 0)

  grads = jax.grad(loss)(params)
  zero = []
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = "/".join(k.key for k in path)
    g = np.asarray(g)
    stacked = "/layers/" in name or "/blocks/" in name
    slices = [g[i] for i in range(g.shape[0])] if stacked else [g]
    for i, s in enumerate(slices):
      if not np.abs(s).max() > 0:
        zero.append(f"{name}[{i}]" if stacked else name)
  n_groups = tiny_cfg.qformer.num_layers // tiny_cfg.qformer.cross_attention_freq
  last = f"layer_{tiny_cfg.qformer.cross_attention_freq - 1}"
  expected_qformer = sorted(f"qformer/layers/{last}/ffn/{m}[{n_groups - 1}]" for m in
                            ("intermediate/bias", "intermediate/kernel", "ln/bias", "ln/scale",
                             "output/bias", "output/kernel"))
  assert sorted(z for z in zero if not z.startswith("vit/")) == expected_qformer
  vit_leaves = sum(1 for _ in jax.tree_util.tree_leaves(grads["vit"]))
  assert all(not np.asarray(g).any() for g in jax.tree_util.tree_leaves(grads["vit"])) and vit_leaves > 0


def test_every_parameter_has_logical_axis_names(tiny_cfg):
  model = LlamaVid(tiny_cfg)
  batch = make_batch(tiny_cfg, 2, np.random.RandomState(0))
  boxed = jax.eval_shape(model.init, jax.random.key(0), **batch)["params"]
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
    if any(getattr(k, "key", None) in ("layers", "blocks") for k in path):
      assert leaf.names[0] == "layers", jax.tree_util.keystr(path)


@pytest.mark.slow
def test_sharded_forward_on_2x4_mesh_equals_one_device(video, tiny_cfg):
  model, params, batch = video
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  boxed = jax.eval_shape(model.init, jax.random.key(0), **batch)["params"]
  shards = sharding.param_shardings(boxed, mesh)
  sharded = jax.device_put(params, shards)
  P = jax.sharding.PartitionSpec
  embed = ("fsdp", "sequence")   # parameters split over every data-like axis
  assert sharded["llm"]["layers"]["q_proj"]["kernel"].sharding.spec == P(None, embed, "tensor", None)
  assert sharded["llm"]["layers"]["k_proj"]["kernel"].sharding.spec == P(None, embed, None, None)  # 2 kv heads
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    got, _ = jax.jit(model.apply)({"params": sharded}, **batch)
  want, _ = model.apply({"params": params}, **batch)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_fp32(video, tiny_cfg):
  model, params, batch = video
  want, _ = model.apply({"params": params}, **batch)
  got, _ = LlamaVid(dataclasses.replace(tiny_cfg, dtype="bfloat16")).apply({"params": params}, **batch)
  assert np.isfinite(got).all() and not np.array_equal(got, want)   # bfloat16 compute did take effect
  assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


@pytest.mark.slow
def test_frame_chunks_equal_all_frames_at_once(tiny_cfg):
  """frame_chunk (nn.scan over chunks of frames, for long videos) changes nothing."""
  model = LlamaVid(tiny_cfg)
  batch = make_batch(tiny_cfg, 4, np.random.RandomState(3), valid_frames=[4, 3])
  params = jax.jit(model.init)(jax.random.key(0), **batch)["params"]   # jit: one compile, not op by op
  want, out = jax.jit(model.apply)({"params": params}, **batch)
  got, out2 = jax.jit(LlamaVid(dataclasses.replace(tiny_cfg, frame_chunk=2)).apply)({"params": params}, **batch)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(out2["context_attention"], out["context_attention"], atol=1e-6)


@pytest.mark.slow
def test_generate_greedy_equals_argmax_of_full_forward(video, tiny_cfg):
  """Cached greedy decoding picks, at every step, the argmax of a full forward pass
  over the prompt plus the tokens chosen so far."""
  from llamavid_jax.generate import generate
  model, params, batch = video
  batch = dict(batch, text_mask=np.ones_like(batch["text_mask"]))
  new = np.asarray(generate(model, params, batch, max_new_tokens=4, eos_id=-1))
  assert new.shape == (B, 4)
  ids = batch["input_ids"]
  for k in range(4):
    full = dict(batch, input_ids=np.concatenate([ids, new[:, :k]], 1),
                text_mask=np.ones((B, S + k), bool))
    logits, out = model.apply({"params": params}, **full)
    last = np.asarray(out["layout"].valid).sum(1) - 1       # sample 1 has a padding frame
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[np.arange(B), last], -1), new[:, k])
