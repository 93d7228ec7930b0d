"""Multiple choice by answer log-likelihood (`eval.score --choices`)."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from eval import score

def _images(tmp_path):
  rng = np.random.RandomState(0)
  for name in ("a.png", "b.png"):
    Image.fromarray((rng.rand(30, 40, 3) * 255).astype("uint8")).save(tmp_path / name)


@pytest.mark.slow   # the shared tiny training run
def test_choices_pick_the_most_likely_option_and_count_accuracy(tiny_ckpt, tmp_path, capsys):
  _images(tmp_path)
  ckpt = os.path.join(tiny_ckpt, "inference")
  options = ["red", "a green ball", "blue"]
  scorer = score.Scorer(ckpt)
  want = {}
  for name in ("a.png", "b.png"):
    media = scorer.m.media(image=str(tmp_path / name))
    want[name] = [scorer.score("What is it?", o, frames=media.array)["logprob"] for o in options]
  best = {k: int(np.argmax(v)) for k, v in want.items()}
  rows = [dict(id="q1", question="What is it?", options=options, answer=best["a.png"], image="a.png"),
          dict(id="q2", question="What is it?", options=options, answer=options[(best["b.png"] + 1) % 3],
               image="b.png"),
          dict(id="q3", question="What is it?", options=options, image="a.png")]          # no answer
  (tmp_path / "mc.json").write_text(json.dumps(rows))
  out = tmp_path / "pred.jsonl"
  got = score.main(["--ckpt", ckpt, "--choices", str(tmp_path / "mc.json"), "--media-folder", str(tmp_path),
                    "--out", str(out)])
  assert (got["count"], got["with_answer"], got["accuracy"]) == (3, 2, 0.5)
  recs = [json.loads(l) for l in out.read_text().splitlines()]
  np.testing.assert_allclose(recs[0]["logprobs"], want["a.png"], rtol=1e-6)
  assert [r["choice"] for r in recs] == [best["a.png"], best["b.png"], best["a.png"]]
  assert [r["correct"] for r in recs] == [True, False, None]


@pytest.mark.parametrize("row, match", [
    (dict(id="x", question="q", options=["a"], image="a.png"), "at least 2 strings"),
    (dict(id="x", question="q", options=["a", "b"], answer="c", image="a.png"), "'c' is not one of its options"),
    (dict(id="x", question="q", options=["a", "b"], answer=2, image="a.png"), r"option index in \[0, 2\)"),
    (dict(id="x", question="q", options=["a", "b"]), "exactly one of video, image, features"),
    (dict(id="x", question="q", options=["a", "b"], image="nope.png"), "1 media file"),
])
def test_bad_choice_files_are_named_before_the_model_loads(row, match, tmp_path, capsys, monkeypatch):
  _images(tmp_path)
  monkeypatch.setattr(score, "Scorer", lambda *a, **k: pytest.fail("the model was loaded"))
  (tmp_path / "mc.json").write_text(json.dumps([row]))
  (tmp_path / "ck").mkdir()
  with pytest.raises(SystemExit):
    score.main(["--ckpt", str(tmp_path / "ck"), "--choices", str(tmp_path / "mc.json"), "--media-folder",
                str(tmp_path)])
  err = capsys.readouterr().err
  assert re.search(match, err) and ("mc.json" in err or "nope.png" in err), err


@pytest.mark.slow   # the shared tiny training run
def test_a_movie_is_scored_with_the_movie_prompt_in_movie_mode(tiny_ckpt, tmp_path):
  """eval.score on a feature file with subtitle-interleaved `inputs`: the release's movie
  prompt (start prompt, inputs, end prompt, question), features without CLS, the model
  in movie mode; the same features without `inputs` score as a clip."""
  import dataclasses

  import jax
  from llamavid_jax.data import features
  from llamavid_jax.models import LlamaVid
  ckpt = os.path.join(tiny_ckpt, "inference")
  scorer = score.Scorer(ckpt)
  cfg = scorer.cfg
  n1, c = cfg.feature_shape
  feats = np.random.RandomState(0).randn(3, n1, c).astype(np.float16)
  inputs = "<image> hello there<image><image> the end"
  features.write_safetensors(str(tmp_path / "movie.safetensors"), features.Movie(feats, inputs))
  np.save(tmp_path / "clip.npy", feats.astype(np.float32))
  movie = scorer.m.media(features=str(tmp_path / "movie.safetensors"))
  assert movie.is_movie and movie.array.shape == (3, n1 - 1, c)
  got = score.main(["--ckpt", ckpt, "--features", str(tmp_path / "movie.safetensors"), "--question", "What?",
                    "--answer", "a cat"])
  ids, n_prompt = scorer.token_ids("What?", "a cat", media=movie)
  assert ids[:n_prompt] == scorer.m.request("What?", movie)["input_ids"].tolist() and ids.count(-200) == 3
  assert "Below is a movie." in scorer.m.prompt("What?", movie)
  q = scorer.qtokenizer("What?")
  model = LlamaVid(dataclasses.replace(cfg, video_mode="movie"))
  logits, _ = jax.jit(model.apply)({"params": scorer.params}, np.asarray([ids], np.int32), np.ones((1, len(ids)), bool),
                                   np.ones((1, 3), bool), np.asarray([q.input_ids], np.int32),
                                   np.asarray([q.attention_mask], bool), features=movie.array[None])
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), -1)
  shift = 3 * (cfg.tokens_per_frame - 1)                      # every placeholder takes one frame's tokens
  want = [float(logp[i + shift - 1, ids[i]]) for i in range(n_prompt, len(ids))]
  np.testing.assert_allclose(got["token_logprobs"], want, atol=1e-5)
  clip = score.main(["--ckpt", ckpt, "--features", str(tmp_path / "clip.npy"), "--question", "What?",
                     "--answer", "a cat"])
  assert clip["num_tokens"] == got["num_tokens"] and abs(clip["logprob"] - got["logprob"]) > 1e-3
