"""Long-video (movie) mode: one placeholder per frame among the subtitles, features
without CLS (for the Q-Former too), the question as every frame's instruction.

Parity with a PyTorch forward written the release's way (each `<image>` repeated
video_token = 2 times, the frame tokens written in order onto the -200 positions),
agreement with the clip mode where the two must agree, the data pipeline on a movie
feature file, and cached generation on a movie prompt."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import linen as nn

from llamavid_jax import generate as G
from llamavid_jax.checkpoint import mapping, orbax_io
from llamavid_jax.models import LlamaVid, splice_labels
from llamavid_jax.models.splice import splice_layout, spliced_length
from tests import torch_llamavid as tl

TOL = 1e-4
IMG = -200


def report(name, diff):
  print(f"PARITY {name}: max abs diff {diff:.3e}")
  assert diff <= TOL, f"{name}: {diff}"


def movie_ids(rng, vocab, subtitles, question_len):
  """bos, a few prompt ids, then per frame: -200 + that frame's subtitle ids (`subtitles`
  = ids per frame, 0 = the next frame follows at once), then the question's ids."""
  ids = [1, *rng.randint(3, vocab, 3)]
  for n in subtitles:
    ids += [IMG, *rng.randint(3, vocab, n)]
  return ids + list(rng.randint(3, vocab, question_len))


def batch_of(rows, text_len, frame_slots, feats, qids, qlen=6):
  """rows of ids -> right-padded model inputs; feats[b]: float[T_b, N, C]; qids[b]: ids."""
  b = len(rows)
  ids = np.zeros((b, text_len), np.int32)
  text_mask = np.zeros((b, text_len), bool)
  features = np.zeros((b, frame_slots) + feats[0].shape[1:], np.float32)
  frame_mask = np.zeros((b, frame_slots), bool)
  q, qmask = np.zeros((b, qlen), np.int32), np.zeros((b, qlen), bool)
  for i, r in enumerate(rows):
    ids[i, :len(r)], text_mask[i, :len(r)] = r, True
    features[i, :len(feats[i])], frame_mask[i, :len(feats[i])] = feats[i], True
    q[i, :len(qids[i])], qmask[i, :len(qids[i])] = qids[i], True
  return dict(input_ids=ids, text_mask=text_mask, frame_mask=frame_mask, qformer_ids=q, qformer_mask=qmask,
              features=features)


@pytest.fixture(scope="module")
def ref():
  """The torch reference at tiny sizes, a 2x2 patch grid (N = 4: the release's
  `shape[1] % 2` CLS test is a no-op on it, as on 256 patches), in movie mode."""
  cfg = tl.tiny_config(llm_vocab=64, bert_vocab=40)
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=28), video_mode="movie")
  r = tl.TorchLlamaVid(cfg)
  sd = r.model_state()
  params = mapping.to_flax(mapping.model_rules(cfg), sd.__getitem__, orbax_io.shape_tree(cfg))
  return r, cfg, params


def test_movie_logits_match_the_release_long_video_path(ref):
  """Two movies in one batch (3 and 2 frames of 3 slots), subtitles of 2, 0 and 3 ids
  after the frames (0: two placeholders side by side), instructions of 5 and 3 ids;
  features float32 and bfloat16 (cast inside the model)."""
  r, cfg, params = ref
  rng = np.random.RandomState(0)
  n, c = cfg.feature_shape
  assert (n, c) == (4, 176) and cfg.input_spec.feature_shape == (4, 176)
  rows = [movie_ids(rng, cfg.llm.vocab_size, (2, 0, 3), 4), movie_ids(rng, cfg.llm.vocab_size, (1, 2), 3)]
  feats = [rng.randn(3, n + 1, c).astype(np.float32), rng.randn(2, n + 1, c).astype(np.float32)]   # as stored
  qids = [list(rng.randint(5, 40, 5)), list(rng.randint(5, 40, 3))]
  batch = batch_of(rows, 20, 3, [f[:, 1:] for f in feats], qids)            # the data layer drops CLS
  apply = jax.jit(LlamaVid(cfg).apply)
  for dtype in (np.float32, ml_dtypes.bfloat16):
    x = batch["features"].astype(dtype)
    logits, out = apply({"params": params}, **dict(batch, features=x))
    logits, valid = np.asarray(logits), np.asarray(out["layout"].valid)
    assert logits.shape[1] == spliced_length(20, 3, 2, movie=True) == 23
    diff = 0.0
    for b, row in enumerate(rows):
      t = len(feats[b])
      vis = r.movie_tokens_from_features(torch.from_numpy(x[b, :t].astype(np.float32)), qids[b])
      release_ids = [j for i in row for j in ([i, i] if i == IMG else [i])]   # <image> * video_token
      want = r.movie_logits(release_ids, vis)
      assert want.shape[0] == valid[b].sum() == len(row) + t
      diff = max(diff, float(np.abs(logits[b, valid[b]] - want).max()))
    report(f"movie vs release long-video path ({np.dtype(dtype).name} features)", diff)


def test_one_placeholder_per_frame_is_the_clip_splice_when_frames_sit_together(ref):
  """Without subtitles, T adjacent placeholders of one frame each (movie) splice as one
  placeholder of T frames (clip): the same layout and visual token order with and
  without the context token, and a content-only model (no Q-Former, so the CLS the
  clip features carry is never read) gives the same logits in both modes. (With the
  context token the logits differ: the clip Q-Former sees the CLS, the movie one not.)"""
  _, cfg, params = ref
  rng = np.random.RandomState(1)
  n, c = cfg.feature_shape
  head, tail = [1, *rng.randint(3, 64, 3)], list(rng.randint(3, 64, 4))
  feats = [rng.randn(3, n + 1, c).astype(np.float32), rng.randn(2, n + 1, c).astype(np.float32)]
  qids = [[5, 6], [7]]
  clip_batch = batch_of([head + [IMG] + tail] * 2, 12, 3, feats, qids)
  movie_batch = batch_of([head + [IMG] * 3 + tail, head + [IMG] * 2 + tail], 14, 3, [f[:, 1:] for f in feats], qids)
  for tpf in (1, 2):
    lay = {movie: splice_layout(jnp.asarray(bt["input_ids"]), jnp.asarray(bt["text_mask"]),
                                jnp.asarray(bt["frame_mask"]), tpf, movie=movie)
           for movie, bt in ((False, clip_batch), (True, movie_batch))}
    k = {False: 3 * tpf, True: tpf}                                     # visual tokens per placeholder
    for name in ("valid", "is_vis"):
      np.testing.assert_array_equal(getattr(lay[False], name), getattr(lay[True], name))
    flat = {m: np.where(l.is_vis, l.prompt_idx * k[m] + l.vis_idx, -1) for m, l in lay.items()}
    np.testing.assert_array_equal(flat[False], flat[True])
    assert lay[True].valid.shape[1] == spliced_length(12, 3, tpf) == spliced_length(14, 3, tpf, movie=True)

  content = {"llm": params["llm"], "token_gen": {"mm_projector": params["token_gen"]["mm_projector"]}}
  movie = dataclasses.replace(cfg, use_context_token=False)
  clip = dataclasses.replace(movie, video_mode="clip")
  lc, oc = jax.jit(LlamaVid(clip).apply)({"params": content}, **clip_batch)
  lm, om = jax.jit(LlamaVid(movie).apply)({"params": content}, **movie_batch)
  valid = np.asarray(om["layout"].valid)
  report("content-only movie vs clip", float(np.abs(np.asarray(lc) - np.asarray(lm))[valid].max()))
