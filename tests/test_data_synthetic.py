"""The synthetic video-QA generator: deterministic, answers true to the decoded mp4s,
tokenizers that load like real ones and keep every answer one token."""

import json
import os

import numpy as np
import pytest

from llamavid_jax.data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, synthetic
from llamavid_jax.data.conversation import encode_conversation
from llamavid_jax.data.tokenizer import load_llm_tokenizer, load_qformer_tokenizer
from llamavid_jax.data.video import load_video


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("syn"))
  return out, synthetic.generate(out, num_train=24, num_eval=8, seed=3, size=64, frames=4, num_long=1,
                                 long_frames=40)


def nearest_color(rgb) -> str:
  names = list(synthetic.COLORS)
  d = [np.abs(np.asarray(synthetic.COLORS[n], float) - rgb).sum() for n in names]
  return names[int(np.argmin(d))]


def object_mask(frame, color):
  return np.abs(frame.astype(float) - synthetic.COLORS[color]).sum(-1) < 90


def test_same_seed_same_json_and_frames(data, tmp_path):
  out, _ = data
  again = str(tmp_path / "again")
  synthetic.generate(again, num_train=24, num_eval=8, seed=3, size=64, frames=4, num_long=1, long_frames=40)
  for name in ("train.json", "heldout.json", "long.json", "manifest.json"):
    assert open(os.path.join(out, name)).read() == open(os.path.join(again, name)).read()
  a, _ = load_video(os.path.join(out, "videos/train_00005.mp4"))
  b, _ = load_video(os.path.join(again, "videos/train_00005.mp4"))
  np.testing.assert_array_equal(a, b)
  train = {s["id"] for s in json.load(open(os.path.join(out, "train.json")))}
  held = {s["id"] for s in json.load(open(os.path.join(out, "heldout.json")))}
  assert len(train) == 24 and len(held) == 8 and not train & held


def test_answers_are_true_to_the_decoded_video(data):
  out, manifest = data
  kinds = set()
  for truth in manifest["splits"]["train"] + manifest["splits"]["heldout"]:
    split = truth["id"].split("_")[0]
    frames, info = load_video(os.path.join(out, "videos", truth["id"] + ".mp4"), fps=1.0)
    assert len(frames) == 4 and info["indices"] == [0, 2, 4, 6]      # 2 fps -> every 2nd frame
    objs = truth["objects"]
    seen = {nearest_color(frames[0][object_mask(frames[0], o["color"])].mean(0)) for o in objs}
    assert seen == {o["color"] for o in objs}, truth["id"]           # colours survive H.264
    for o in objs:                                                    # and motion goes the stated way
      first, last = [np.argwhere(object_mask(f, o["color"])).mean(0) for f in (frames[0], frames[-1])]
      dy, dx = last - first
      want = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5}[o["direction"]]
      assert want, (truth["id"], o["direction"], dy, dx)
    kinds.add(truth["kind"])
    if truth["kind"] == "count":
      assert truth["answer"] == synthetic.COUNTS[len(objs)]
  assert kinds == set(synthetic.QUESTION_TYPES)


def test_grid_clips_keep_each_object_in_its_own_cell_moving_its_way(tmp_path):
  """--grid 4 at 56 px (the demo ViT's 4x4 patches of 14): in every kept frame each
  object's pixels lie in one cell (but for an edge row at the ends of its path), a cell
  no other object uses; inside it the object moves 0.3 cell (4.2 px) its way."""
  m = synthetic.generate(str(tmp_path), num_train=12, num_eval=0, seed=1, size=56, frames=4, grid=4)
  steps = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
  for truth in m["splits"]["train"]:
    frames, _ = load_video(os.path.join(tmp_path, "videos", truth["id"] + ".mp4"), fps=1.0)
    cells = []
    for o in truth["objects"]:
      centres = []
      for f in frames:
        ys, xs = np.nonzero(object_mask(f, o["color"]))
        assert len(ys) > 25, truth["id"]
        cell_of = [(int(y) // 14, int(x) // 14) for y, x in zip(ys, xs)]
        home = max(set(cell_of), key=cell_of.count)
        assert cell_of.count(home) >= 0.9 * len(cell_of), (truth["id"], o["color"])
        cells.append(home)
        centres.append((ys.mean(), xs.mean()))
      move = np.subtract(centres[-1], centres[0])
      assert np.allclose(move, np.multiply(steps[o["direction"]], 0.3 * 14), atol=1.0), (truth["id"], o, move)
    assert len(set(cells)) == len(truth["objects"]), truth["id"]   # one cell each, the same in every frame


def test_needle_appears_at_its_depth(data):
  out, manifest = data
  (truth,) = manifest["splits"]["long"]
  frames, _ = load_video(os.path.join(out, "videos", truth["id"] + ".mp4"), fps=1.0)
  lit = [k for k, f in enumerate(frames) if object_mask(f, truth["answer"]).sum() > 20]
  assert lit == [truth["frame"], truth["frame"] + 1, truth["frame"] + 2]


def test_needle_clips_of_drawn_lengths_and_depths(tmp_path):
  """--long-frames MIN-MAX draws each clip's length (log-uniform), --long-depths its
  needle's depth; the mp4 has that many frames and long_qa.json asks the same questions."""
  out = str(tmp_path)
  m = synthetic.generate(out, num_train=0, num_eval=0, seed=1, size=28, num_long=12, long_frames=(4, 32),
                         long_depths=(0.0, 1.0))
  truth = m["splits"]["long"]
  frames = [t["frames"] for t in truth]
  assert all(4 <= f <= 32 for f in frames) and len(set(frames)) > 3
  assert all(0 <= t["depth"] <= 1 and t["frame"] == synthetic.needle_frame(t["depth"], t["frames"]) for t in truth)
  for t in truth[:3]:
    clip, _ = load_video(os.path.join(out, "videos", t["id"] + ".mp4"), fps=1.0)
    lit = [k for k, f in enumerate(clip) if object_mask(f, t["answer"]).sum() > 10]
    assert len(clip) == t["frames"] and lit == [t["frame"], t["frame"] + 1, t["frame"] + 2], t
  qa = json.load(open(os.path.join(out, "long_qa.json")))
  assert [(q["video_id"], q["answer"], q["question"]) for q in qa] == [
      (t["id"], t["answer"], synthetic.NEEDLE_QUESTION) for t in truth]
  assert synthetic.needle_frame(0.0, 64) == 0 and synthetic.needle_frame(1.0, 64) == 61
  with pytest.raises(ValueError, match="needle at depth"):
    synthetic.needle_frame(0.5, 2)
  with pytest.raises(ValueError, match="long_frames"):
    synthetic.generate(out, num_train=0, num_eval=0, num_long=1, long_frames=(8, 4))


def test_tokenizers_load_like_real_ones_and_answers_are_single_tokens(data):
  out, _ = data
  llm = load_llm_tokenizer(os.path.join(out, "tokenizers", "llm"))
  assert llm("red").input_ids[0] == llm.bos_token_id == 1 and llm.eos_token_id == 2 and llm.pad_token_id == 0
  answers = list(synthetic.COLORS) + list(synthetic.SHAPES) + list(synthetic.DIRECTIONS) + list(synthetic.COUNTS.values())
  for a in answers:
    assert len(llm(a, add_special_tokens=False).input_ids) == 1, a
  qf = load_qformer_tokenizer(os.path.join(out, "tokenizers", "qformer"))
  for s in json.load(open(os.path.join(out, "train.json"))):
    conv = s["conversations"]
    q = conv[0]["value"].replace("<image>\n", "")
    assert qf.unk_token_id not in qf(q).input_ids, q
    enc = encode_conversation(conv, llm, "vicuna_v1", has_media=True)
    assert llm.unk_token_id not in enc.input_ids.tolist()
    sup = enc.labels[enc.labels != IGNORE_INDEX].tolist()
    assert sup == llm(conv[1]["value"], add_special_tokens=False).input_ids + [2]   # answer + </s>


def test_every_question_fits_the_demo_qformer_instruction_slot(data):
  """configs/demo.py sizes the Q-Former instruction for the longest synthetic question
  ([CLS] + words + [SEP]); a longer one would be cut from the left and lose its start."""
  from configs import demo
  qf = load_qformer_tokenizer(os.path.join(data[0], "tokenizers", "qformer"))
  rng = np.random.default_rng(0)
  lengths = {q: len(qf(q).input_ids)
             for c in synthetic.COLORS for s in synthetic.SHAPES for kind in synthetic.QUESTION_TYPES
             for _, q, _ in [synthetic.question(rng, [dict(color=c, shape=s, direction="up")] * 2,
                                                synthetic.QUESTION_TYPES, kind)]}
  assert max(lengths.values()) <= demo.get_config().data.qformer_len, max(lengths, key=lengths.get)


def test_multi_turn_conversations_never_give_an_answer_away():
  """--train-turns 4: one question of every kind per clip, answers true to the objects,
  and no question's text names another turn's answer (except the shared count words)."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    objects = synthetic.make_clip(rng, 64, 4)
    qas = synthetic.conversation(rng, objects, synthetic.QUESTION_TYPES, 4)
    assert sorted(k for k, _, _ in qas) == sorted(synthetic.QUESTION_TYPES)
    for kind, q, a in qas:
      others = " ".join(q2 for k2, q2, _ in qas if k2 != kind)
      if kind != "count":
        assert a not in others.replace("?", " ").split(), (q, a, others)
    by = {k: (q, a) for k, q, a in qas}
    o = next(o for o in objects if o["shape"] in by["color"][0])
    assert by["color"][1] == o["color"]
    o = next(o for o in objects if o["color"] in by["shape"][0])
    assert by["shape"][1] == o["shape"]


def test_worker_processes_write_the_same_files(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  a = synthetic.generate(one, num_train=6, num_eval=2, seed=3, size=56, grid=4, workers=1)
  b = synthetic.generate(two, num_train=6, num_eval=2, seed=3, size=56, grid=4, workers=2)
  assert a == b
  for name in sorted(os.listdir(os.path.join(one, "videos"))):
    with open(os.path.join(one, "videos", name), "rb") as f, open(os.path.join(two, "videos", name), "rb") as g:
      assert f.read() == g.read(), name


def test_image_every_turn_puts_the_image_before_every_question(tmp_path):
  """--image-every-turn: every human turn starts with `<image>`, so imgsp_v1 has no
  side to flip (the same ids whatever its coin); without it, the coin moves some."""
  llm = None
  encoded = {}
  for every in (False, True):
    out = str(tmp_path / str(every))
    synthetic.generate(out, num_train=8, num_eval=1, seed=0, size=56, grid=4, train_turns=4, workers=1,
                       image_every_turn=every)
    llm = llm or load_llm_tokenizer(os.path.join(out, "tokenizers", "llm"))
    samples = json.load(open(os.path.join(out, "train.json")))
    human = [t["value"] for s in samples for t in s["conversations"] if t["from"] == "human"]
    assert len(human) == 32 and sum(h.startswith("<image>\n") for h in human) == (32 if every else 8)
    encoded[every] = [[encode_conversation(s["conversations"], llm, "imgsp_v1", has_media=True,
                                           rng=np.random.default_rng(seed)).input_ids.tolist()
                       for seed in (0, 1, 2)] for s in samples]
  for ids in encoded[True]:
    assert ids[0] == ids[1] == ids[2] and ids[0].count(IMAGE_TOKEN_INDEX) == 4
  assert any(ids[0] != ids[1] or ids[0] != ids[2] for ids in encoded[False])


def test_single_object_clips_are_training_only_and_give_no_answer_away(tmp_path):
  m = synthetic.generate(str(tmp_path), num_train=40, num_eval=10, seed=0, size=56, grid=4, train_turns=4,
                         workers=1, single_object=0.5)
  singles = [t for t in m["splits"]["train"] if len(t["objects"]) == 1]
  assert 8 <= len(singles) <= 32
  assert all(len(t["objects"]) in (2, 3) for t in m["splits"]["heldout"])
  for t in singles:
    kinds = [qa["kind"] for qa in t["qa"]]
    assert "count" not in kinds and not {"color", "shape"} <= set(kinds) and "motion" in kinds, kinds
    o = t["objects"][0]
    assert all(qa["answer"] == o[{"color": "color", "shape": "shape", "motion": "direction"}[qa["kind"]]]
               for qa in t["qa"])
  with pytest.raises(ValueError, match="single_object"):
    synthetic.generate(str(tmp_path / "bad"), num_train=2, num_eval=1, questions=["count"], single_object=0.5)


def test_attention_on_asked_finds_the_asked_objects_patches_in_the_decoded_frames(tmp_path):
  """Maps that put all mass on the 14-px patch holding most of each asked object's
  pixels (from the decoded mp4, not the manifest) score 1.0; uniform maps 1/16 per object."""
  m = synthetic.generate(str(tmp_path), num_train=1, num_eval=24, seed=2, size=56, frames=4, grid=4)
  heldout = m["splits"]["heldout"]
  maps = np.zeros((len(heldout), 4, 16))
  for i, truth in enumerate(heldout):
    asked = synthetic.asked_objects(truth)
    assert len(asked) == (len(truth["objects"]) if truth["kind"] == "count" else 1), truth
    frames, _ = load_video(os.path.join(tmp_path, "videos", truth["id"] + ".mp4"), fps=1.0)
    for t, f in enumerate(frames):
      for o in asked:
        ys, xs = np.nonzero(object_mask(f, o["color"]))
        patches = [(int(y) // 14) * 4 + int(x) // 14 for y, x in zip(ys, xs)]
        maps[i, t, max(set(patches), key=patches.count)] += 1 / len(asked) if truth["kind"] == "count" else 1
  got = synthetic.attention_on_asked(m, maps, 4)
  assert set(got) == set(synthetic.QUESTION_TYPES) and all(abs(v - 1) < 1e-9 for v in got.values()), got
  uniform = synthetic.attention_on_asked(m, np.full((len(heldout), 4, 16), 1 / 16), 4)
  count_objects = np.mean([len(t["objects"]) for t in heldout if t["kind"] == "count"])
  assert abs(uniform["color"] - 1 / 16) < 1e-9 and abs(uniform["count"] - count_objects / 16) < 1e-9
