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

from llamavid_jax import generate as G
from llamavid_jax.checkpoint import mapping, orbax_io
from llamavid_jax.models import LlamaVid
from llamavid_jax.models.splice import splice_layout, spliced_length
from tests import data_fixtures as fx
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
  sd = r.model_state() | r.vit_state()
  params = mapping.to_flax(mapping.model_rules(cfg) | mapping.vit_rules(cfg), sd.__getitem__,
                           orbax_io.shape_tree(cfg))
  return r, cfg, params


@pytest.mark.slow
def test_movie_logits_match_the_release_long_video_path(ref):
  """Two movies in one batch (3 and 2 frames of 3 slots), subtitles of 2, 0 and 3 ids
  after the frames (0: two placeholders side by side), instructions of 5 and 3 ids;
  features float32 and bfloat16 (cast inside the model), and frames through the ViT,
  whose CLS output is dropped."""
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

  frames = rng.randn(2, 3, 28, 28, 3).astype(np.float32)
  logits, out = apply({"params": params}, **{**{k: v for k, v in batch.items() if k != "features"}, "frames": frames})
  logits, valid = np.asarray(logits), np.asarray(out["layout"].valid)
  diff = 0.0
  for b, row in enumerate(rows):
    t = len(feats[b])
    with torch.no_grad():
      vit = r.vit(torch.from_numpy(frames[b, :t]).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states[-1]
    vis = r.movie_tokens_from_features(vit[:, 1:], qids[b])
    want = r.movie_logits([j for i in row for j in ([i, i] if i == IMG else [i])], vis)
    diff = max(diff, float(np.abs(logits[b, valid[b]] - want).max()))
  report("movie vs release long-video path (frames through the ViT)", diff)


@pytest.mark.slow
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


# --- data: a movie feature file through the pipeline ------------------------------------

@pytest.fixture(scope="module")
def movie_data(tmp_path_factory, ref):
  """Tiny LLM / BERT tokenizers (tests/data_fixtures.py), three movie files (float16
  [T, N+1, C] with CLS, `inputs` metadata as `features.write_safetensors` writes it)
  and an image, in a LLaVA JSON."""
  from safetensors.numpy import save_file

  from llamavid_jax.data.features import Movie, write_safetensors
  root = str(tmp_path_factory.mktemp("movie"))
  fx.make_root(root)
  cfg = ref[1]
  n, c = cfg.vision.num_tokens, cfg.vision.width
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((3, n, c)).astype(np.float16)
  inputs = "<image>Hello...<image><image>A dog runs."           # frame 1 has no subtitle
  write_safetensors(os.path.join(root, "videos", "m0.safetensors"), Movie(feats, inputs))
  save_file({"features": feats}, os.path.join(root, "videos", "bad.safetensors"),   # the writer refuses it
            metadata={"inputs": "<image>Hello<image>"})
  np.save(os.path.join(root, "videos", "plain.npy"), feats)
  samples = fx.image_samples(root, 1)
  q = fx.qa("<image>\nWhat is this?", "A cat.")
  samples += [{"id": "movie0", "video": "m0.safetensors", "conversations": q},
              {"id": "movie_bad", "video": "bad.safetensors", "conversations": q},
              {"id": "movie_npy", "video": "plain.npy", "conversations": q},
              {"id": "text0", "conversations": fx.qa("Hello", "Hi.")}]
  return dict(root=root, cfg=cfg, feats=feats, inputs=inputs, json=fx.write_dataset(root, samples))


def test_movie_sample_through_the_pipeline_and_a_training_loss(movie_data, ref):
  """The human turn's <image> becomes the movie's inputs ("..." dropped): 3 placeholders
  with the subtitles' ids between them, the release's ids once each repeated <image>
  is one; the question is the instruction; the features are the file's without CLS
  (float16 kept); a wrong placeholder count, a .npy without inputs and an image are
  named skips; the training loss runs on the batch."""
  from llamavid_jax.data import conversation as conv_lib
  from llamavid_jax.data import pipeline as pl
  from train.step import loss_sums
  d = movie_data
  root, cfg = d["root"], d["cfg"]
  pcfg = pl.PipelineConfig(
      data_path=d["json"], image_folder=os.path.join(root, "images"), video_folder=os.path.join(root, "videos"),
      llm_tokenizer=os.path.join(root, "llm"), qformer_tokenizer=os.path.join(root, "bert"), template="imgsp_v1",
      buckets=((32, 4), (48, 4)), batch_size=2, max_len=64, qformer_max_len=8, max_frames=4, read_threads=0,
      max_skip_rate=1.0, min_samples_for_skip_rate=1, feature_dtype="float16")
  p = pl.make_pipeline(pcfg, cfg.input_spec, shard_index=0, shard_count=1)
  skips = {s.id: s for s in p.plan.skips}
  assert {k: s.reason for k, s in skips.items()} == {"movie_bad": "bad_inputs", "movie_npy": "missing_inputs",
                                                    "img0": "not_a_movie"}
  bad = skips["movie_bad"].message()
  assert "'movie_bad'" in bad and "bad.safetensors" in bad and "2 <image> placeholders" in bad and "3 frames" in bad
  batches = [b for b in p]
  b, i = next((b, i) for b in batches for i, s in enumerate(b["sample_index"]) if s == 1)   # movie0
  ids = b["input_ids"][i][b["text_mask"][i]].tolist()
  #   USER: _  <im> Hello <im> <im> A dog runs. \n What is this? ASSISTANT: A cat. </s>
  assert ids == [1, *fx.SYSTEM_IDS, 25, 27, IMG, 35, IMG, IMG, 3, 39, 40, 28, 29, 30, 31, 26, 3, 32, 2]
  assert b["labels"][i][b["text_mask"][i]].tolist() == [-100] * (len(ids) - 3) + [3, 32, 2]
  assert b["input_ids"].shape == (2, 48)              # 41 ids with the subtitles: the (48, 4) bucket
  # the release's prompt: each <image> repeated video_token = 2 times -> the same ids, -200 doubled
  release = conv_lib.build_prompt(conv_lib.get_template("imgsp_v1"), [
      d["inputs"].replace("...", "").replace("<image>", "<image>" * 2) + "\nWhat is this?", "A cat."])
  doubled = [j for x in ids for j in ([x, x] if x == IMG else [x])]
  assert conv_lib.tokenize_with_image(release, p.processor.llm_tok) == doubled
  assert b["qformer_ids"][i].tolist() == [[2, 5, 6, 7, 8, 3, 0, 0]]          # "What is this?"
  assert b["features"].dtype == np.float16 and b["features"].shape[1:] == (4, *cfg.feature_shape)
  np.testing.assert_array_equal(b["features"][i, :3], d["feats"][:, 1:])
  assert b["frame_mask"][i].tolist() == [True] * 3 + [False]

  model, params = LlamaVid(cfg), ref[2]
  batch = {k: jnp.asarray(v) for k, v in b.items() if k != "sample_index"}
  s, n = jax.jit(lambda p: loss_sums(model, p, batch))(params)
  assert int(n) == int((b["labels"] != -100).sum()) > 0 and np.isfinite(float(s)) and float(s) > 0


@pytest.mark.slow
def test_cached_generation_on_a_movie_prompt(ref):
  """Greedy generate with a chunked prefill on two left-padded movie prompts (3 and 2
  frames among subtitles) = the argmax of the full forward, teacher forced."""
  _, cfg, params = ref
  rng = np.random.RandomState(2)
  n, c = cfg.feature_shape
  reqs = [dict(input_ids=np.asarray(movie_ids(rng, 64, sub, 3), np.int32),
               features=rng.randn(len(sub), n, c).astype(np.float32),
               qformer_ids=rng.randint(5, 40, 4).astype(np.int32), qformer_mask=np.ones(4, bool))
          for sub in ((2, 0, 1), (3, 1))]
  batch = G.batch_requests(reqs)
  model = LlamaVid(cfg)
  k = 4
  new = np.asarray(G.generate(model, params, batch, max_new_tokens=k, eos_id=-1, prefill_chunk=5))
  full = dict(batch, input_ids=np.concatenate([batch["input_ids"], new[:, :k - 1]], 1),
              text_mask=np.concatenate([batch["text_mask"], np.ones((2, k - 1), bool)], 1))
  logits, out = jax.jit(model.apply)({"params": params}, **full)
  valid = np.asarray(out["layout"].valid)
  last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], 1)                 # each row's last real position
  pos = last[:, None] - np.arange(k - 1, -1, -1)[None]                     # the prompt's last, then k-1 new
  np.testing.assert_array_equal(np.argmax(np.asarray(logits)[np.arange(2)[:, None], pos], -1), new)


def test_inference_reads_a_movie_file_with_the_release_prompt(movie_data, ref):
  """`inference.Model` on a clip-mode checkpoint: a movie file's Media are its features
  without CLS and its `inputs`; the request's user turn is the release's movie prompt
  ("..." kept), the question is the instruction, and the batch runs in movie mode."""
  from llamavid_jax import inference
  from llamavid_jax.data import tokenizer as tok_lib
  from llamavid_jax.data.conversation import MOVIE_END, MOVIE_START, tokenize_with_image
  d = movie_data
  clip = dataclasses.replace(ref[1], video_mode="clip")
  tok = tok_lib.load_llm_tokenizer(os.path.join(d["root"], "llm"))
  qtok = tok_lib.load_qformer_tokenizer(os.path.join(d["root"], "bert"))
  m = inference.Model(orbax_io.Inference(clip, ref[2], tok, qtok, {}))
  media = m.media(features=os.path.join(d["root"], "videos", "m0.safetensors"))
  assert media.is_movie and media.inputs == d["inputs"] and media.array.dtype == np.float32
  np.testing.assert_array_equal(media.array, d["feats"][:, 1:].astype(np.float32))
  req = m.request("What is this?", media)
  prompt = (fx.SYSTEM + " USER: " + MOVIE_START + d["inputs"] + MOVIE_END + "\nWhat is this? ASSISTANT:")
  assert req["input_ids"].tolist() == tokenize_with_image(prompt, tok) and req["input_ids"].tolist().count(IMG) == 3
  assert req["qformer_ids"].tolist() == [2, 5, 6, 7, 8, 3] and req["video_mode"] == "movie"
  assert m.model_for([req]).cfg == ref[1] and m.model_for([dict(req, video_mode="clip")]) is m.model
  with pytest.raises(ValueError, match="one video_mode"):
    m.model_for([req, dict(req, video_mode="clip")])
