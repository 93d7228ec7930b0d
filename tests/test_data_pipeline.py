"""grain pipeline: batch contract, buckets, determinism, restore, sharding, bad input."""

import collections
import io
import logging
import os

import numpy as np
import pytest

from llamavid_jax.data import DataError
from llamavid_jax.data import image as im
from llamavid_jax.data import pipeline as pl
from tests import data_fixtures as fx

S = fx.SYSTEM_IDS
IMG_IDS = [1, *S, 25, 27, -200, 28, 29, 30, 31, 26, 3, 32, 2]  # "<image>\nWhat is this?" / "A cat."
IMG_LABELS = [-100] * 32 + [3, 32, 2]
TEXT_IDS = [1, *S, 25, 35, 26, 36, 2]  # "Hello" / "Hi."
# Buckets (text, frames); with 2 tokens per frame: text-only samples (29 tokens) -> 0,
# images (35 tokens, 1 frame) -> 1, features (35 tokens, 3 steps) -> 2.
BUCKETS = ((32, 1), (36, 1), (40, 4))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data"))
  fx.make_root(root)
  return root


def _config(root, path, **kw):
  base = dict(data_path=path, image_folder=os.path.join(root, "images"),
              video_folder=os.path.join(root, "videos"), llm_tokenizer=os.path.join(root, "llm"),
              qformer_tokenizer=os.path.join(root, "bert"), template="vicuna_v1", buckets=BUCKETS,
              batch_size=2, max_len=64, qformer_max_len=8, max_frames=4,
              read_threads=0, max_skip_rate=0.5, min_samples_for_skip_rate=1)
  return pl.PipelineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def good(root):
  """6 images (RGB/RGBA/P/L, odd sizes), 3 text-only, 1 .npy and 1 .safetensors feature file."""
  from safetensors.numpy import save_file

  samples = fx.image_samples(root, 6)
  samples += [{"id": f"txt{i}", "conversations": fx.qa("Hello", "Hi.")} for i in range(3)]
  feats = np.arange(3 * 5 * 8, dtype=np.float32).reshape(3, 5, 8)
  np.save(os.path.join(root, "videos", "f0.npy"), feats)
  save_file({"features": feats[:2] + 1}, os.path.join(root, "videos", "f1.safetensors"),
            metadata={"prompt": "Describe it."})
  q = fx.qa("<image>\nWhat is this?", "A cat.")
  samples += [{"id": "feat0", "video": "f0.npy", "conversations": q},
              {"id": "feat1", "video": "f1.safetensors", "conversations": q}]
  return fx.write_dataset(os.path.join(root), samples)


def _run(pipeline):
  it = iter(pipeline)
  out = list(it)
  it.close()
  return out


def test_batch_contract(root, good):
  p = pl.make_pipeline(_config(root, good), fx.SPEC, shard_index=0, shard_count=1)
  batches = _run(p)
  assert len(batches) == len(p) == 3 + 2 + 1  # 6 images / 2, 3 texts -> 2, 2 features -> 1
  by_index = {}
  for key, b in zip((k for k, _ in p.plan.batches), batches):
    text_len, frames = BUCKETS[key[1]]
    vis = (frames, 16, 16, 3) if key[0] == "frames" else (frames, 5, 8)
    assert {k: v.shape for k, v in b.items()} == {
        "input_ids": (2, text_len), "labels": (2, text_len), "text_mask": (2, text_len),
        key[0]: (2, *vis), "frame_mask": (2, frames), "qformer_ids": (2, 1, 8),
        "qformer_mask": (2, 1, 8), "sample_index": (2,)}
    ids, labels, tm, fm = b["input_ids"], b["labels"], b["text_mask"], b["frame_mask"]
    assert ((labels == -100) | (labels == ids)).all()                 # a label is ignored or its own token
    assert (ids[~tm] == 0).all() and (labels[~tm] == -100).all()       # text padding: pad id, no label
    assert (fm[:, 1:] <= fm[:, :-1]).all()                             # valid frames first
    assert ((b["sample_index"] >= -1) & (b["sample_index"] < 11)).all()
    for r, i in enumerate(b["sample_index"]):
      by_index[int(i)] = {k: v[r] for k, v in b.items()}
  assert sorted(by_index) == [-1] + list(range(11))
  # An RGBA image sample (index 1): exact ids, labels, masks, pixels, Q-Former ids.
  row = by_index[1]
  assert row["input_ids"].tolist() == IMG_IDS + [0]
  assert row["labels"].tolist() == IMG_LABELS + [-100]
  assert row["text_mask"].tolist() == [True] * 35 + [False]
  assert row["frame_mask"].tolist() == [True]
  from PIL import Image
  ref = im.preprocess_image(Image.open(os.path.join(root, "images", "img1.png")), size=16)
  np.testing.assert_array_equal(row["frames"][0], ref)
  assert row["qformer_ids"].tolist() == [[2, 5, 6, 7, 8, 3, 0, 0]]
  assert row["qformer_mask"].tolist() == [[True] * 6 + [False] * 2]
  # Text only: no placeholder, no frames.
  row = by_index[6]
  assert row["input_ids"].tolist() == TEXT_IDS + [0, 0, 0]
  assert row["labels"].tolist() == [-100] * 27 + [36, 2] + [-100] * 3
  assert not row["frame_mask"].any() and not row["frames"].any() and not row["qformer_mask"].any()
  # Features: .npy (3 steps, first-turn instruction), .safetensors (2 steps, stored prompt).
  row = by_index[9]
  assert row["frame_mask"].tolist() == [True, True, True, False]
  np.testing.assert_array_equal(row["features"][:3], np.arange(120, dtype=np.float32).reshape(3, 5, 8))
  assert not row["features"][3].any()
  row = by_index[10]
  assert row["frame_mask"].tolist() == [True, True, False, False]
  assert row["qformer_ids"].tolist() == [[2, 9, 10, 11, 3, 0, 0, 0]]  # "Describe it."
  # The padding row of the short text batch.
  row = by_index[-1]
  assert not row["text_mask"].any() and not row["frame_mask"].any() and not row["qformer_mask"].any()
  assert (row["labels"] == -100).all()
  assert len(p.batch_shapes) == 3


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_restore_mid_epoch_yields_exactly_the_rest(root, good, workers):
  cfg = _config(root, good, worker_count=workers, seed=3)
  p = pl.make_pipeline(cfg, fx.SPEC, shard_index=0, shard_count=1)
  it = iter(p)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  rest = list(it)
  it.close()
  assert len(first) + len(rest) == 6
  it2 = iter(pl.make_pipeline(cfg, fx.SPEC, shard_index=0, shard_count=1))
  it2.set_state(state)
  restored = list(it2)
  it2.close()
  _assert_same(restored, rest)
  # And the whole run equals a fresh run with 0 workers (worker count changes nothing).
  _assert_same(first + rest, _run(pl.make_pipeline(_config(root, good, seed=3), fx.SPEC,
                                                    shard_index=0, shard_count=1)))


def test_seed_determinism_and_epochs(root, good):
  plan = lambda **kw: pl.make_pipeline(_config(root, good, **kw), fx.SPEC, shard_index=0, shard_count=1).plan
  rows = lambda p: [r.tolist() for _, r in p.batches]
  assert rows(plan(seed=1)) == rows(plan(seed=1))
  assert rows(plan(seed=1)) != rows(plan(seed=2))
  two = plan(seed=1, num_epochs=2)
  counts = collections.Counter(i for _, r in two.batches for i in r.tolist())
  assert counts == {i: 2 for i in range(11)}
  assert len(two.batches) == 11  # 12 images / 2, 6 texts / 2, 4 features / 2


def test_sharding_by_process(root, good):
  plans = [pl.make_pipeline(_config(root, good, batch_size=1), fx.SPEC, shard_index=k, shard_count=2).plan
           for k in range(2)]
  keys = [[k for k, _ in p.batches] for p in plans]
  assert keys[0] == keys[1]  # every step has the same bucket (shape) on both processes
  seen = [i for p in plans for _, r in p.batches for i in r.tolist() if i >= 0]
  assert sorted(seen) == list(range(11))
  assert len(plans[0].batches) == 6


def test_a_state_saved_with_two_processes_positions_one(root, good):
  """The state is the global batch index (+ skip counters): both shards of a 2-process
  run hold the same one, and a 1-process pipeline (same global batch) set to it yields
  the rest of the global batches, each the 2 shards' rows side by side."""
  shards = [iter(pl.make_pipeline(_config(root, good, batch_size=1, seed=5), fx.SPEC, shard_index=k,
                                  shard_count=2)) for k in range(2)]
  for it in shards:
    [next(it) for _ in range(2)]
  states = [it.get_state() for it in shards]
  assert states[0] == states[1] == {"batch_index": 2, "seen": states[0]["seen"], "skips": {}}
  rest = [[b["sample_index"].tolist() for b in it] for it in shards]
  one = iter(pl.make_pipeline(_config(root, good, batch_size=2, seed=5), fx.SPEC, shard_index=0, shard_count=1))
  one.set_state(states[0])
  got = [b["sample_index"].tolist() for b in one]
  assert got == [a + b for a, b in zip(*rest)] and len(got) == 4
  with pytest.raises(DataError, match=r"data state batch_index=7: the plan has 6 batches"):
    one.set_state({**states[0], "batch_index": 7})


# ---- bad input --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(root):
  """Two good images and every kind of bad sample."""
  samples = fx.image_samples(root, 2)
  q = fx.qa("<image>\nWhat is this?", "A cat.")
  buf = io.BytesIO()
  fx.random_image(np.random.default_rng(0), 40, 30).save(buf, format="PNG")
  with open(os.path.join(root, "images", "cut.png"), "wb") as f:
    f.write(buf.getvalue()[:200])
  with open(os.path.join(root, "videos", "junk.mp4"), "wb") as f:
    f.write(b"\x00not a video" * 10)
  fx.write_video(os.path.join(root, "videos", "empty.mp4"), frames=0)
  with open(os.path.join(root, "videos", "old.pkl"), "wb") as f:
    f.write(b"\x80\x04K\x01.")
  samples += [
      {"id": "missing", "image": "nope.png", "conversations": q},
      {"id": "truncated", "image": "cut.png", "conversations": q},
      {"id": "junkvideo", "video": "junk.mp4", "conversations": q},
      {"id": "emptyvideo", "video": "empty.mp4", "conversations": q},
      {"id": "pickle", "video": "old.pkl", "conversations": q},
      {"id": "nogpt", "conversations": fx.qa("Hello", "x")[:1]},
      {"id": "long", "conversations": fx.qa("Hello " * 40, "Hi.")},
  ]
  path = os.path.join(root, "bad.json")
  import json
  with open(path, "w") as f:
    json.dump(samples, f)
  return path


def test_every_bad_input_is_counted_and_named(root, bad, caplog):
  caplog.set_level(logging.WARNING, logger="llamavid_jax.data.pipeline")
  p = pl.make_pipeline(_config(root, bad, max_skip_rate=0.9), fx.SPEC, shard_index=0, shard_count=1)
  v = os.path.join(root, "videos")
  planned = {s.id: s for s in p.plan.skips}
  assert {k: (s.reason, s.field) for k, s in planned.items()} == {
      "missing": ("missing_file", "image"),
      "junkvideo": ("unreadable_video", "video"),
      "emptyvideo": ("no_video_stream", "video"),
      "pickle": ("pickle_features", "video"),
      "nogpt": ("no_gpt_turn", "conversations"),
      "long": ("too_long", "conversations"),
  }
  assert planned["missing"].message() == (
      f"sample 'missing' (index 2) field 'image' (file {root}/images/nope.png): "
      "missing_file: file not found")
  assert planned["emptyvideo"].message() == (
      f"sample 'emptyvideo' (index 5) field 'video' (file {v}/empty.mp4): no_video_stream: "
      "no video stream")
  assert planned["long"].message() == (
      "sample 'long' (index 8) field 'conversations': too_long: 69 text tokens > max_len 64")
  assert planned["junkvideo"].message().startswith(
      f"sample 'junkvideo' (index 4) field 'video' (file {v}/junk.mp4): unreadable_video: "
      "InvalidDataError")
  assert planned["nogpt"].message() == (
      "sample 'nogpt' (index 7) field 'conversations': no_gpt_turn: no gpt turn (roles ['human'])")
  # The truncated image fails in the worker: its row is padding, the skip is counted.
  it = iter(p)
  batches = list(it)
  assert it.skip_counts == {"unreadable_image": 1} and it.seen == 3
  indices = sorted(i for b in batches for i in b["sample_index"].tolist())
  assert indices == [-1, -1, 0, 1]  # the truncated image and the padding row
  logged = "\n".join(r.getMessage() for r in caplog.records)
  for sid in ["missing", "truncated", "junkvideo", "emptyvideo", "pickle", "nogpt"]:
    assert f"sample '{sid}'" in logged
  # planning names its first 5 skips (plan.SKIPS_NAMED) and sums up all of them in one line
  assert "sample 'long'" not in logged
  assert ("6 of 9 samples skipped (missing_file 1, unreadable_video 1, no_video_stream 1, pickle_features 1, "
          "no_gpt_turn 1, too_long 1), first 5 named above") in logged
  assert f"sample 'truncated' (index 3) field 'image' (file {root}/images/cut.png): unreadable_image:" in logged
  # State carries the counters.
  assert it.get_state()["skips"] == {"unreadable_image": 1}


def test_a_second_plan_reuses_the_first_ones_verdicts(root, bad, caplog, monkeypatch):
  """train.make_data plans one epoch to count batches, then the real run: the second
  plan (3 epochs) probes no sample again and logs no skip twice, yet counts them."""
  caplog.set_level(logging.WARNING, logger="llamavid_jax.data.pipeline")
  one = pl.make_pipeline(_config(root, bad, max_skip_rate=0.9), fx.SPEC, shard_index=0, shard_count=1)
  probed = []
  monkeypatch.setattr(pl.SampleProcessor, "bucket_of", lambda self, s: probed.append(s.index))
  three = pl.make_pipeline(_config(root, bad, max_skip_rate=0.9, num_epochs=3), fx.SPEC, shard_index=0,
                           shard_count=1, processor=one.processor)
  assert probed == []
  assert [s.id for s in three.plan.skips] == [s.id for s in one.plan.skips] and len(one.plan.skips) == 6
  assert sum("sample 'missing'" in r.getMessage() for r in caplog.records) == 1
  assert sorted(i for _, rows in three.plan.batches for i in rows.tolist() if i >= 0) == [0, 0, 0, 1, 1, 1, 3, 3, 3]
  with pytest.raises(ValueError, match="buckets differ"):
    one.processor.with_config(_config(root, bad, buckets=((64, 1),)))


def test_skip_rate_bound_while_planning(root, bad):
  with pytest.raises(DataError, match=r"skip rate 6/9 = 0\.667 exceeds max_skip_rate 0\.5 while "
                     r"planning; last: sample 'pickle' \(index 6\) field 'video' \(file .*old\.pkl\): "
                     r"pickle_features: .*; by reason: \{'missing_file': 1, 'unreadable_video': 1, "
                     r"'no_video_stream': 1, 'no_gpt_turn': 1, 'too_long': 1, 'pickle_features': 1\}"):
    pl.make_pipeline(_config(root, bad), fx.SPEC, shard_index=0, shard_count=1)


def test_skip_rate_bound_at_run_time(root):
  samples = fx.image_samples(root, 1) + [
      {"id": "truncated", "image": "cut.png", "conversations": fx.qa("<image>\nWhat is this?", "A cat.")}]
  path = fx.write_dataset(os.path.join(root, "videos"), samples)  # a second JSON file
  p = pl.make_pipeline(_config(root, path, batch_size=1, seed=0, max_skip_rate=0.4),
                       fx.SPEC, shard_index=0, shard_count=1)
  with pytest.raises(DataError, match=r"skip rate 1/\d = \d\.\d+ exceeds max_skip_rate 0\.4; last: "
                     r"sample 'truncated' \(index 1\) field 'image' \(file .*cut\.png\): "
                     r"unreadable_image: .*by reason: \{'unreadable_image': 1\}"):
    list(iter(p))


def test_video_sample(root):
  """A real clip through the PyAV decoder (llamavid_jax.data.video)."""
  from llamavid_jax.data import video  # noqa: F401  (the pipeline imports it lazily, in its workers)
  fx.write_video(os.path.join(root, "videos", "clip.mp4"), frames=12, fps=4)  # 3 s -> 3 frames
  path = fx.write_dataset(os.path.join(root, "videos"), [
      {"id": "clip", "video": "clip.mp4", "conversations": fx.qa("<image>\nWhat is this?", "A cat.")}])
  p = pl.make_pipeline(_config(root, path, batch_size=1), fx.SPEC, shard_index=0, shard_count=1)
  (b,) = _run(p)
  assert b["frame_mask"].tolist() == [[True, True, True, False]]
  assert b["input_ids"][0, :35].tolist() == IMG_IDS


@pytest.mark.slow
def test_imgsp_v1_multi_turn_batch_runs_the_model(root, tiny_cfg, tmp_path):
  """imgsp_v1 end to end: a two-turn image sample gets two placeholders and two
  instruction slots (each turn's question), a three-turn one fits no bucket with
  P = 2 (`too_many_turns`), and a tiny LlamaVid takes the batch: every supervised
  label survives the splice, in order, and the loss is finite."""
  import jax
  import jax.numpy as jnp

  from llamavid_jax.models import LlamaVid, splice_labels, spliced_length
  samples = fx.image_samples(str(tmp_path), 3, seed=1)
  samples[0]["conversations"] = fx.qa("What is this?\n<image>", "A cat.", "What color?", "Red.")
  samples[1]["conversations"] = fx.qa("<image>\nWhat is this?", "A cat.", "What color?", "Red.",
                                      "Hello", "Hi.")
  path = fx.write_dataset(str(tmp_path), samples)
  cfg = _config(root, path, template="imgsp_v1", buckets=((56, 1, 2),), image_folder=str(tmp_path / "images"))
  spec = tiny_cfg.input_spec
  p = pl.make_pipeline(cfg, spec, shard_index=0, shard_count=1)
  assert [(s.id, s.reason) for s in p.plan.skips] == [("img1", "too_many_turns")]
  assert "3 <image> placeholders (one per human turn) fit no bucket's instruction slots" in p.plan.skips[0].detail
  (batch,) = _run(p)
  rows = {int(i): r for r, i in enumerate(batch["sample_index"])}
  two, one = rows[0], rows[2]
  ids = batch["input_ids"][two].tolist()
  assert ids.count(-200) == 2 and batch["input_ids"][one].tolist().count(-200) == 1
  # the second turn's <image> sits at its start or its end, the same side on every run
  assert ids[:43] in ([1, *S, 25, 27, -200, 28, 29, 30, 31, 26, 3, 32, 2, 25, 27, -200, 28, 29, 33, 26, 34],
                      [1, *S, 25, 27, -200, 28, 29, 30, 31, 26, 3, 32, 2, 25, 29, 33, 28, -200, 26, 34, 2])
  assert _run(pl.make_pipeline(cfg, spec, shard_index=0, shard_count=1))[0]["input_ids"][two].tolist() == ids
  assert batch["qformer_ids"].shape == (2, 2, 8)
  assert batch["qformer_ids"][two].tolist() == [[2, 5, 6, 7, 8, 3, 0, 0], [2, 5, 12, 8, 3, 0, 0, 0]]
  assert batch["qformer_mask"][one].tolist() == [[True] * 6 + [False] * 2, [False] * 8]

  model = LlamaVid(tiny_cfg)
  inputs = {k: jnp.asarray(batch[k]) for k in
            ("input_ids", "text_mask", "frame_mask", "qformer_ids", "qformer_mask", "frames")}
  params = model.init(jax.random.key(0), **inputs)["params"]
  logits, out = model.apply({"params": params}, **inputs)
  assert logits.shape[1] == spliced_length(56, 1, tiny_cfg.tokens_per_frame, 2) == 58
  labels = np.asarray(splice_labels(jnp.asarray(batch["labels"]), out["layout"]))
  for r in range(2):
    assert labels[r][labels[r] != -100].tolist() == batch["labels"][r][batch["labels"][r] != -100].tolist()
  assert labels[two][labels[two] != -100].tolist() == [3, 32, 2, 34, 2]
  logp = jax.nn.log_softmax(logits[:, :-1])
  tgt = jnp.asarray(labels[:, 1:])
  nll = -jnp.take_along_axis(logp, jnp.maximum(tgt, 0)[..., None], -1)[..., 0]
  assert np.isfinite(float(jnp.where(tgt != -100, nll, 0).sum()))
