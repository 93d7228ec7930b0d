"""Hardening (issue 27), tried as a careless or hostile user would: each case asserts the
one-line message or the refusal, and that no input file changed (hashes before and after).

- no code from a checkpoint (`auto_map` refused, even with "y" on stdin);
- questions used as typed (the release's `vicuna_v1` prompt, built here as its
  `conversation.py` builds it) in score, chat and eval.run;
- sampling flags and the position budget refused before anything compiles;
- no command overwrites its inputs; NaN media, 16-bit images, question files, media paths,
  non-UTF-8 chat input; subtitle encodings; the judge's malformed replies and deadline;
  pickle bounds; corrupt checkpoints named in one line.
"""

import codecs
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from eval import chat, judge, predict, run, score
from eval.benchmarks import common
from llamavid_jax import engine as engine_lib
from llamavid_jax import generate as gen
from llamavid_jax import inference, validation
from llamavid_jax.data import features as ft
from llamavid_jax.data import subtitles as subs
from llamavid_jax.data import tokenizer as tok_lib
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = "What is this?"
TYPED = [Q + " ", Q + "\n", "What\nis this?"]   # trailing space, trailing newline, inner newline
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def digest(*paths) -> dict:
  """sha256 of every file under `paths` (files or folders)."""
  out = {}
  for p in map(str, paths):
    files = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
    for f in files:
      with open(f, "rb") as fh:
        out[f] = hashlib.sha256(fh.read()).hexdigest()
  return out


# --- the release's prompt, as its conversation.py and mm_utils build it ----------------
def release_prompt(question: str) -> str:
  """`conv_templates["vicuna_v1"]`: messages [[USER, "<image>\\n" + qs], [ASSISTANT, None]],
  `get_prompt()` with SeparatorStyle.TWO (sep " ", sep2 "</s>")."""
  messages = [("USER", "<image>\n" + question), ("ASSISTANT", None)]
  seps = [" ", "</s>"]
  ret = SYSTEM + seps[0]
  for i, (role, message) in enumerate(messages):
    ret += role + ": " + message + seps[i % 2] if message else role + ":"
  return ret


def release_ids(prompt: str, tokenizer) -> list[int]:
  """The release's `tokenizer_image_token` (llava/mm_utils.py)."""
  chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
  ids, offset = [], 0
  if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
    offset = 1
    ids.append(chunks[0][0])
  sep = [-200] * (offset + 1)
  joined = [e for sub in zip(chunks, [sep] * len(chunks)) for e in sub][:-1]
  for x in joined:
    ids.extend(x[offset:])
  return ids


@pytest.fixture(scope="module")
def model(tiny_ckpt):
  return inference.load(tiny_ckpt)


@pytest.fixture(scope="module")
def video(clip28):
  return clip28


@pytest.fixture
def recorded(model, monkeypatch):
  """The model's generate / stream record their requests and answer "ok" without compiling;
  any other way into the generator fails the test."""
  asked = []

  def fake_generate(self, requests, **kw):
    self.check_generation(requests, **{k: kw[k] for k in ("max_new_tokens", "temperature", "top_p")
                                       if kw.get(k) is not None})
    asked.extend(requests)
    return [inference.Answer("ok", [5]) for _ in requests]

  def fake_stream(self, request, **kw):
    yield from (a.text for a in fake_generate(self, [request], **kw))
    self.last_answer = inference.Answer("ok", [5])

  class FakeHandle(list):   # iterates the answer's pieces
    def __init__(self):
      super().__init__(["ok"])

    def result(self):
      return engine_lib.Completion("ok", [5], "stop", 0, 1)

    def cancel(self):
      pass

  class FakeEngine:   # eval.chat's engine: records, answers "ok", compiles nothing
    def __init__(self, m, max_positions, **kw):
      self.max_positions = max_positions

    def submit(self, request, sampling):
      asked.append(request)
      return FakeHandle()

    def close(self):
      pass

  monkeypatch.setattr(inference.Model, "generate", fake_generate)
  monkeypatch.setattr(inference.Model, "stream", fake_stream)
  monkeypatch.setattr(engine_lib, "Engine", FakeEngine)
  monkeypatch.setattr(inference, "load", lambda *a, **k: model)
  monkeypatch.setattr(inference, "check_ckpt", lambda path, *a, **k: path)   # --ckpt is a stand-in
  for name in ("generate", "stream"):
    monkeypatch.setattr(gen, name, lambda *a, **k: pytest.fail("the generator was reached"))
  return asked


# --- 1. no code from a checkpoint ------------------------------------------------------
def evil_checkpoint(tiny_ckpt, tmp_path):
  ckpt = tmp_path / "evil"
  shutil.copytree(os.path.join(tiny_ckpt, "inference"), ckpt)
  marker = tmp_path / "RAN"
  cfg = ckpt / "tokenizer" / "tokenizer_config.json"
  data = json.loads(cfg.read_text())
  data["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
  cfg.write_text(json.dumps(data))
  (ckpt / "tokenizer" / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                  "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
  return ckpt, cfg, marker


@pytest.mark.slow
def test_an_auto_map_checkpoint_is_refused_even_with_yes_on_stdin(tiny_ckpt, tmp_path, video):
  ckpt, cfg, marker = evil_checkpoint(tiny_ckpt, tmp_path)
  before = digest(ckpt, video)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-m", "eval.chat", "--ckpt", str(ckpt), "--video", video],
                     input="y\nWhat shape?\n", env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1, p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and f"{cfg}: has an 'auto_map'" in last, p.stderr
  assert "Traceback" not in p.stderr and not marker.exists()
  assert digest(ckpt, video) == before
  # the library call refuses the same way, before transformers reads anything
  with pytest.raises(tok_lib.RemoteCodeError, match="auto_map"):
    tok_lib.load_llm_tokenizer(str(ckpt / "tokenizer"))
  assert not marker.exists()


# --- 2. questions used as typed -------------------------------------------------------
def test_turns_are_kept_as_typed_only_the_image_placeholder_moves():
  assert inference.prompt_turns(TYPED) == [TYPED[0], TYPED[1], "<image>\nWhat\nis this?"]
  assert inference.prompt_turns(["<image>\n" + Q + " ", "a ", " " + Q]) == [Q + " ", "a ", "<image>\n " + Q]
  for q in TYPED:
    assert inference.inference_prompt(q) == release_prompt(q)


@pytest.mark.parametrize("question", TYPED, ids=["trailing-space", "trailing-newline", "inner-newline"])
def test_score_chat_and_run_give_the_release_prompt_ids(model, video, recorded, tmp_path, question):
  tok = model.tokenizer
  want = release_ids(release_prompt(question), tok)
  assert want != release_ids(release_prompt(question.strip()), tok) or "\n" in question.strip()
  media = model.media(video=video)
  # score
  ids, n = score.Scorer(model).token_ids(question, "a cat", media=media)
  assert ids[:n] == want
  # chat --question, and the interactive loop (a typed line keeps its trailing space)
  chat.main(["--ckpt", str(tmp_path), "--video", video, "--question", question, "--json"], stdout=io.StringIO())
  assert recorded[-1]["input_ids"].tolist() == want
  if "\n" not in question:
    chat.main(["--ckpt", str(tmp_path), "--video", video], stdin=io.StringIO(question + "\n\n"),
              stdout=io.StringIO())
    assert recorded[-1]["input_ids"].tolist() == want
  # eval.run: a question file with that question
  vids = tmp_path / "video"
  vids.mkdir()
  shutil.copy(video, vids / "v0.mp4")
  qfile = tmp_path / "q.json"
  qfile.write_text(json.dumps([{"video_id": "v0", "question": question, "answer": "x", "id": 0}]))
  run.main(["msvd_qa", "--ckpt", str(tmp_path), "--out", str(tmp_path / "pred.jsonl"), "--gt-file", str(qfile),
            "--video-folder", str(vids), "--no-progress"], predictor=predict.Predictor(model, max_new_tokens=4))
  assert recorded[-1]["input_ids"].tolist() == want


# --- 3. one validation layer ----------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
])
def test_sampling_flags_are_refused_before_the_model(tmp_path, video, monkeypatch, capsys, flags, message):
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("a model was loaded"))
  qfile = tmp_path / "q.json"
  qfile.write_text(json.dumps([{"video_id": "v0", "question": Q, "answer": "x", "id": 0}]))
  before = digest(qfile, video)
  for main, argv in [(chat.main, ["--ckpt", str(tmp_path), "--video", video, "--question", Q]),
                     (run.main, ["msvd_qa", "--ckpt", str(tmp_path), "--out", str(tmp_path / "p.jsonl"),
                                 "--gt-file", str(qfile), "--video-folder", str(tmp_path)])]:
    with pytest.raises(SystemExit) as e:
      main(argv + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()   # one line: no argparse usage block (cli.ArgumentParser)
    assert len(err) == 1 and message in err[0] and err[0].endswith(" (see --help)"), err
  assert digest(qfile, video) == before and not (tmp_path / "p.jsonl").exists()


def budget_message(model) -> str:
  return f"the model has {model.position_budget:,} (llm.max_positions x rope_scaling)"


def test_a_huge_max_new_tokens_is_refused_before_any_compile(model, video, recorded, tmp_path, capsys):
  before = digest(video)
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", str(tmp_path), "--video", video, "--question", Q, "--max-new-tokens", "1000000000"])
  msg = str(e.value.code)
  assert "1,000,000,000 new tokens" in msg and budget_message(model) in msg and "\n" not in msg
  qfile = tmp_path / "q.json"
  qfile.write_text(json.dumps([{"video_id": "clip", "question": Q, "answer": "x", "id": 0}]))
  with pytest.raises(SystemExit) as e:
    run.main(["msvd_qa", "--ckpt", str(tmp_path), "--out", str(tmp_path / "p.jsonl"), "--gt-file", str(qfile),
              "--video-folder", os.path.dirname(video), "--max-new-tokens", "1000000000", "--no-progress"])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--max-new-tokens: the request needs 1,000,000,001 LLM positions" in err and budget_message(model) in err
  assert f"(1 prompt ids, 0 frames x {model.cfg.tokens_per_frame} tokens = 0, 1,000,000,000 new tokens)" in err
  assert not recorded and digest(video) == before


def test_a_100k_character_question_is_refused_naming_the_budget(model, video, recorded, tmp_path):
  question = ("what is this " * 8000)[:100_000]
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", str(tmp_path), "--video", video, "--question", question])
  assert "LLM positions" in str(e.value.code) and budget_message(model) in str(e.value.code)
  # the interactive loop names it, drops that question and goes on
  err = io.StringIO()
  sys_stderr, sys.stderr = sys.stderr, err
  try:
    out = io.StringIO()
    chat.main(["--ckpt", str(tmp_path), "--video", video], stdin=io.StringIO(f"{question}\n{Q}\n\n"), stdout=out)
  finally:
    sys.stderr = sys_stderr
  assert "that question was dropped" in err.getvalue() and len(err.getvalue().splitlines()) == 1
  assert out.getvalue().count("ok") == 1 and len(recorded) == 1
  # scoring too
  with pytest.raises(validation.BudgetError, match="the model has"):
    score.Scorer(model).score(question, "a", media=model.media(video=video))


def test_a_10000_frame_feature_file_is_refused_before_any_compile(model, recorded, tmp_path):
  path = tmp_path / "long.npy"
  np.save(path, np.zeros((10_000, *model.cfg.feature_shape), np.float32))
  before = digest(path)
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", str(tmp_path), "--features", str(path), "--question", Q])
  assert "10,000 frames" in str(e.value.code) and budget_message(model) in str(e.value.code)
  assert not recorded and digest(path) == before


def test_a_long_video_is_refused_before_decoding_without_a_frame_cap(model, video, monkeypatch):
  from llamavid_jax.data import sources
  monkeypatch.setattr(sources, "probe_video", lambda path: (10_000, 1.0))
  import llamavid_jax.data.video as video_lib
  monkeypatch.setattr(video_lib, "load_video", lambda *a, **k: pytest.fail("decoded"))
  assert model.sample_cap is None
  with pytest.raises(inference.MediaError, match=rf"10,000 frames at 1 fps need .*{re.escape(budget_message(model))}"):
    model.media(video=video)


def test_check_optimizer_names_every_bad_value():
  errs = validation.check_optimizer({"lr": -1.0, "b1": 1.5, "weight_decay": float("nan"), "eps": 1e-8,
                                     "warmup_ratio": 0.1, "name": "adamw"})
  assert errs == ["optim.lr must be > 0, got -1.0", "optim.b1 must be in (0, 1), got 1.5",
                  "optim.weight_decay must be finite, got nan"]
  assert validation.check_optimizer({"lr": 1e-3, "b2": 0.999, "weight_decay": 0.0}) == []


# --- 4. no command overwrites its inputs ----------------------------------------------
def test_outputs_over_inputs_are_refused(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(run, "model_predictor", lambda args: pytest.fail("a model was loaded"))
  pred = tmp_path / "p.jsonl"
  pred.write_text("".join(json.dumps({"id": i, "question": "q", "answer": "a", "pred": "a"}) + "\n" for i in range(40)))
  qfile = tmp_path / "q.json"
  qfile.write_text(json.dumps([{"video_id": "v0", "question": Q, "answer": "x", "id": 0}]))
  os.link(pred, tmp_path / "hard.jsonl")
  before = digest(pred, qfile)
  cases = [
      (judge.main, ["--pred", str(pred), "--out", str(pred)], "--out"),
      (judge.main, ["--pred", str(pred), "--out", str(tmp_path / "hard.jsonl")], "--out"),
      (judge.main, ["--pred", str(pred), "--out", str(tmp_path / "s.json"), "--cache", str(pred)], "--cache"),
      (run.main, ["msvd_qa", "--score-only", "--pred", str(pred), "--out", str(pred)], "--out"),
      (run.main, ["msvd_qa", "--ckpt", str(tmp_path), "--out", str(qfile), "--gt-file", str(qfile),
                  "--video-folder", str(tmp_path)], "--out"),
      (run.main, ["msvd_qa", "--ckpt", str(tmp_path), "--out", str(pred), "--summary", str(pred),
                  "--gt-file", str(qfile), "--video-folder", str(tmp_path)], "--summary"),
      (score.main, ["--ckpt", str(tmp_path), "--choices", str(qfile), "--out", str(qfile)], "--out"),
  ]
  for main, argv, flag in cases:
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} " in err[0] and "refusing to overwrite an input" in err[0], err
  assert digest(pred, qfile) == before


def test_summaries_are_written_through_a_rename(tmp_path, monkeypatch):
  calls = []
  real = os.replace
  monkeypatch.setattr(os, "replace", lambda a, b: calls.append((a, b)) or real(a, b))
  pred = tmp_path / "p.jsonl"
  pred.write_text(json.dumps({"id": 0, "question": "q", "answer": "a", "pred": "a"}) + "\n")
  monkeypatch.delenv("OPENAI_API_BASE", raising=False)
  monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
  judge.main(["--pred", str(pred), "--out", str(tmp_path / "s.json")])
  assert calls and calls[-1][1] == str(tmp_path / "s.json") and json.load(open(tmp_path / "s.json"))["count"] == 1


# --- 5. inputs checked for what they are ----------------------------------------------
def test_nan_features_are_refused_naming_the_file(model, recorded, tmp_path):
  feats = np.zeros((2, *model.cfg.feature_shape), np.float32)
  feats[1, 0, 3] = np.nan
  path = tmp_path / "nan.npy"
  np.save(path, feats)
  before = digest(path)
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", str(tmp_path), "--features", str(path), "--question", Q])
  assert str(e.value.code) == f"error: {path}: 1 of {feats.size:,} values are NaN or infinite"
  # features convert: the release's pickle with an infinity is not converted
  pkl = tmp_path / "m.pkl"
  feats[1, 0, 3] = np.inf
  pkl.write_bytes(pickle.dumps({"feats": feats.astype(np.float16), "inputs": "<image><image>"}))
  before.update(digest(pkl))
  lines = []
  counts = ft.convert(str(pkl), str(tmp_path / "m.safetensors"), log=lines.append)
  assert counts["failed"] == 1 and not (tmp_path / "m.safetensors").exists()
  assert lines == [f"FAILED {pkl}: bad_features: 1 feature values are NaN or infinite (first in frame 1)"]
  assert digest(path, pkl) == before and not recorded


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
  from PIL import Image

  from llamavid_jax.data.image import load_image
  a16 = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
  path = tmp_path / "g16.png"
  Image.fromarray(a16).save(path)
  got = np.asarray(load_image(str(path)))
  assert (got[..., 0] == np.rint(a16 / 257)).all() and (got[..., 0] == got[..., 2]).all()
  clipped = np.asarray(Image.open(path).convert("RGB"))[..., 0]   # what PIL alone gives: clipped at 255
  assert (clipped == np.minimum(a16, 255)).all() and not (clipped == got[..., 0]).all()
  pytest.importorskip("fastapi")
  from eval import serve   # the server's image parts: the same scaling
  np.testing.assert_array_equal(np.asarray(serve._image(f"file://{path}", "image_url", str(tmp_path))), got)


@pytest.mark.parametrize("entries, message", [
    ([1, 2, 3], "entry 0 is a int, not a JSON object"),
    ([{"video_id": "a", "question": Q, "answer": "x", "id": 1},
      {"video_id": "b", "question": Q, "answer": "y", "id": "1"}], "entry 1: id '1' and an earlier 1 are one key"),
    ([{"video_id": "a", "question": Q, "answer": "x", "id": [1]}], "entry 0: id [1] is a list"),
    ([{"video_id": "a", "question": Q, "id": 0}], "entry 0 (id 0) has no 'answer'"),
    ([{"video_id": "../secret", "question": Q, "answer": "x", "id": 0}], "leads outside the media folder"),
    ([{"video_id": "/etc/passwd", "question": Q, "answer": "x", "id": 0}], "is an absolute path"),
])
def test_question_files_are_checked_entry_by_entry(tmp_path, monkeypatch, capsys, entries, message):
  monkeypatch.setattr(run, "model_predictor", lambda args: pytest.fail("a model was loaded"))
  (tmp_path / "video").mkdir()
  qfile = tmp_path / "q.json"
  qfile.write_text(json.dumps(entries))
  before = digest(qfile)
  with pytest.raises(SystemExit) as e:
    run.main(["msvd_qa", "--ckpt", str(tmp_path), "--out", str(tmp_path / "p.jsonl"), "--gt-file", str(qfile),
              "--video-folder", str(tmp_path / "video"), "--no-progress"])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(qfile) in err[0] and message in err[0], err
  assert digest(qfile) == before and not (tmp_path / "p.jsonl").exists()


def test_media_names_stay_inside_the_media_folder(tmp_path):
  with pytest.raises(ValueError, match="leads outside the media folder"):
    common.media_path(str(tmp_path), "a/../../x.png", "q.jsonl:1")
  assert common.media_path(str(tmp_path), "a/../x.png") == os.path.join(str(tmp_path), "a/../x.png")
  f = tmp_path / "c.json"
  f.write_text(json.dumps([{"id": 0, "question": Q, "options": ["a", "b"], "image": "../x.png"}]))
  with pytest.raises(ValueError, match=r"c\.json: entry 0 \(id 0\): the media name '../x.png' leads outside"):
    score.read_choices(str(f), str(tmp_path / "media"))


def test_the_chat_loop_survives_a_line_that_is_not_utf8(model, video, recorded, tmp_path, capsys):
  stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 ?\n" + Q.encode() + b" \n\n"), encoding="utf-8")
  out = io.StringIO()
  chat.main(["--ckpt", str(tmp_path), "--video", video], stdin=stdin, stdout=out)
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["eval.chat: that line is not UTF-8 text (byte 3: b'\\xe9'); it was ignored"]
  assert out.getvalue().endswith("USER: exit...\n") and len(recorded) == 1
  assert recorded[0]["input_ids"].tolist() == release_ids(release_prompt(Q + " "), model.tokenizer)


# --- 6. subtitles ---------------------------------------------------------------------
SRT = "1\n00:00:00,500 --> 00:00:01,500\nCafé crème, naïve\n\n2\n00:00:02,000 --> 00:00:03,000\nÀ bientôt\n"


def test_subtitle_encodings_give_the_same_inputs(tmp_path):
  paths = {}
  for name, data in [("utf8", SRT.encode()), ("utf8bom", codecs.BOM_UTF8 + SRT.encode()),
                     ("utf16", SRT.encode("utf-16")), ("utf16be", codecs.BOM_UTF16_BE + SRT.encode("utf-16-be")),
                     ("utf32", SRT.encode("utf-32")), ("cp1252", SRT.encode("cp1252"))]:
    paths[name] = tmp_path / f"{name}.srt"
    paths[name].write_bytes(data)
  before = digest(tmp_path)
  times = [0.0, 1.0, 2.0, 3.0]
  want = subs.movie_inputs(subs.read_subtitles(str(paths["utf8"])), times)
  assert "Café crème, naïve" in want
  for name in ("utf8bom", "utf16", "utf16be", "utf32"):
    assert subs.movie_inputs(subs.read_subtitles(str(paths[name])), times) == want, name
  assert subs.movie_inputs(subs.read_subtitles(str(paths["cp1252"]), "cp1252"), times) == want
  with pytest.raises(subs.SubtitleError) as e:   # not guessed silently: named, with a hint
    subs.read_subtitles(str(paths["cp1252"]))
  msg = str(e.value)
  assert msg.startswith(f"{paths['cp1252']}: bad_subtitles: not utf-8 text (byte 35: b'\\xe9'")
  assert "--subtitle-encoding" in msg and "\n" not in msg
  # cp1250 reads these bytes as well as cp1252 ("crčme"): listed with it, neither offered as the one
  assert "it reads as any of" in msg and "cp1252" in msg and "cp1250" in msg and "it looks like" not in msg
  ru = tmp_path / "ru.srt"   # an unambiguous one is offered
  ru.write_bytes("1\n00:00:00,500 --> 00:00:01,500\nПривет, как дела? Это простой тест субтитров на русском языке.\n".encode("cp1251"))
  with pytest.raises(subs.SubtitleError, match="it looks like cp1251: give --subtitle-encoding cp1251$"):
    subs.read_subtitles(str(ru))
  ru.unlink()
  # the extract CLI's planning reads the cues with --subtitle-encoding
  from llamavid_jax import extract
  (tmp_path / "v.mp4").write_bytes(b"")
  job, = extract.plan([str(tmp_path / "v.mp4")], str(tmp_path / "out"), subtitles=str(paths["cp1252"]),
                      subtitle_encoding="cp1252")
  assert job.status != "failed" and subs.movie_inputs(job.cues, times) == want
  job, = extract.plan([str(tmp_path / "v.mp4")], str(tmp_path / "out"), subtitles=str(paths["cp1252"]))
  assert job.status == "failed" and "bad_subtitles" in job.error
  (tmp_path / "v.mp4").unlink()
  assert digest(tmp_path) == before


# --- 7. the judge ---------------------------------------------------------------------
class Server:
  """A chat endpoint whose POSTs answer in turn from `replies`: (status, body bytes) or a
  number of seconds to hang."""

  def __init__(self, replies):
    self.replies, self.requests = list(replies), 0
    outer = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *a):
        pass

      def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        outer.requests += 1
        r = outer.replies.pop(0) if len(outer.replies) > 1 else outer.replies[0]
        if isinstance(r, (int, float)):
          time.sleep(r)
          return
        status, body = r
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


def completion(content: str) -> tuple[int, bytes]:
  return 200, json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}]}).encode()


def test_a_judge_reply_that_is_not_json_is_malformed_and_retried(tmp_path):
  pred = tmp_path / "p.jsonl"
  pred.write_text(json.dumps({"id": 0, "question": "q", "answer": "a", "pred": "a"}) + "\n")
  before = digest(pred)
  s = Server([(200, b"<html>busy</html>"), (200, b'{"choices": 3}'), completion("{'pred': 'yes', 'score': 5}")])
  try:
    out = judge.main(["--pred", str(pred), "--out", str(tmp_path / "s.json"), "--api-base", s.url,
                      "--backoff", "0", "--max-retries", "2"])
  finally:
    s.close()
  assert (out["count"], out["malformed_replies"], out["accuracy"], s.requests) == (1, 2, 1.0, 3)
  s = Server([(200, b"<html>busy</html>")])   # one wave: max_retries + 1 requests, then malformed
  try:
    out = judge.main(["--pred", str(pred), "--out", str(tmp_path / "s2.json"), "--api-base", s.url,
                      "--backoff", "0", "--max-retries", "2"])
  finally:
    s.close()
  assert (out["malformed"], out["malformed_replies"], s.requests) == (1, 3, 3)
  assert digest(pred) == before


def test_the_judge_deadline_bounds_a_hanging_endpoint(tmp_path):
  pred = tmp_path / "p.jsonl"
  pred.write_text(json.dumps({"id": 0, "question": "q", "answer": "a", "pred": "a"}) + "\n")
  s = Server([30])
  try:
    with pytest.raises(SystemExit, match=r"error: the overall --deadline of 1 s has passed"):
      judge.main(["--pred", str(pred), "--out", str(tmp_path / "s.json"), "--api-base", s.url,
                  "--deadline", "1", "--backoff", "0.1"])
  finally:
    s.close()
  assert s.requests == 1   # the first request's timeout was cut to the deadline


@pytest.mark.parametrize("flags, message", [(["--max-retries", "-1"], "--max-retries must be >= 0"),
                                            (["--timeout", "0"], "--timeout must be > 0"),
                                            (["--deadline", "-5"], "--deadline must be > 0")])
def test_negative_judge_values_are_refused(tmp_path, capsys, flags, message):
  pred = tmp_path / "p.jsonl"
  pred.write_text(json.dumps({"id": 0, "question": "q", "answer": "a", "pred": "a"}) + "\n")
  with pytest.raises(SystemExit) as e:
    judge.main(["--pred", str(pred), "--out", str(tmp_path / "s.json"), *flags])
  assert e.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_a_missing_judge_pred_is_named(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    judge.main(["--pred", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s.json")])
  assert e.value.code == 2 and f"--pred {tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err


def test_score_only_on_another_benchmarks_predictions_is_one_line(tmp_path, capsys):
  pred = tmp_path / "p.jsonl"
  pred.write_text(json.dumps({"id": 1, "question": "q", "answer": "a", "pred": "a"}) + "\n")   # msvd_qa's
  before = digest(pred)
  with pytest.raises(SystemExit) as e:
    run.main(["mme", "--score-only", "--pred", str(pred)])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 1 and f"--pred {pred}" in err[0], err
  assert digest(pred) == before


# --- 8. pickles, checkpoints, one-line errors -----------------------------------------
def test_pickle_bounds(tmp_path):
  big = tmp_path / "keys.pkl"
  big.write_bytes(pickle.dumps({f"k{i}": i for i in range(1_000_000)}))
  with pytest.raises(ft.MovieError) as e:
    ft.read_movie(str(big))
  assert len(str(e.value)) < 400 and "got 1,000,000 keys" in str(e.value)
  # ~130 bytes that numpy's _reconstruct would turn into an 87 MB array
  path = tmp_path / "bomb.pkl"
  path.write_bytes(pickle.dumps({"feats": Reduce(np.ndarray.__reduce__(np.zeros(1))[0],
                                                 (np.ndarray, (87_000_000,), b"b"))}, 4))
  assert path.stat().st_size < 160
  with pytest.raises(ft.UnsafePickleError, match=r"refused numpy _reconstruct of shape \(87000000,\)"):
    ft.read_movie(str(path))
  zeros = tmp_path / "zeros.pkl"
  zeros.write_bytes(pickle.dumps({"feats": Reduce(bytes, (100_000_000,))}, 4))
  with pytest.raises(ft.UnsafePickleError, match=r"refused bytes\(int\)"):
    ft.read_movie(str(zeros))


class Reduce:
  """Pickles as `fn(*args)`."""

  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def test_broken_checkpoints_are_named_in_one_line(tiny_ckpt, tmp_path, video, caplog):
  good = os.path.join(tiny_ckpt, "inference")
  bad_cfg = tmp_path / "cfg"
  shutil.copytree(good, bad_cfg)
  (bad_cfg / "model_config.json").write_text('{"llm": {"nonexistent": 1}}')
  with pytest.raises(inference.CheckpointError, match=rf"^{bad_cfg}/model_config.json: not a model config: "):
    inference.load(str(bad_cfg))
  garbled = tmp_path / "meta"
  shutil.copytree(good, garbled)
  meta = next(os.path.join(d, f) for d, _, fs in os.walk(garbled / "params") for f in fs if f == "_METADATA")
  with open(meta, "w") as f:
    f.write("garbage{")
  before = digest(garbled)
  with caplog.at_level("INFO"), pytest.raises(inference.CheckpointError,
                                              match=rf"^{garbled}: corrupt or unreadable checkpoint"):
    inference.load(str(garbled))
  assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []   # orbax's warning held back
  assert digest(garbled) == before
  torn = tmp_path / "torn"   # a parameter file cut short (a copy killed mid-way)
  shutil.copytree(good, torn)
  data = sorted(os.path.join(d, f) for d, _, fs in os.walk(torn / "params") for f in fs if os.sep + "d" in d)
  assert data
  for f in data:   # every data file: which one a load reads first is the file system's order
    os.truncate(f, 50)
  with pytest.raises(inference.CheckpointError, match=rf"^{torn}: corrupt or unreadable checkpoint \("):
    inference.load(str(torn))


def test_cli_run_prints_one_line(tmp_path, capsys, monkeypatch):
  from llamavid_jax import cli

  def main():
    raise validation.BudgetError(10, 5, "x" * 5000)
  with pytest.raises(SystemExit) as e:
    cli.run(main)
  err = capsys.readouterr().err
  assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: the request needs 10 LLM")
  assert len(err) < cli.LIMIT + 100

  def usage():
    raise validation.UsageError("--x must be > 0\nsecond line")
  with pytest.raises(SystemExit) as e:
    cli.run(usage)
  assert e.value.code == 2 and capsys.readouterr().err == "error: --x must be > 0 second line\n"
  monkeypatch.setenv("LLAMAVID_DEBUG", "1")
  with pytest.raises(validation.UsageError):
    cli.run(usage)


def test_missing_media_and_failures_are_summed_up_in_one_line(tmp_path, monkeypatch, caplog, capsys):
  monkeypatch.setattr(run, "model_predictor", lambda args: pytest.fail("a model was loaded"))
  (tmp_path / "video").mkdir()
  for i in range(0, 30, 3):
    (tmp_path / "video" / f"v{i}.mp4").write_bytes(b"x")
  qfile = tmp_path / "q.json"
  qfile.write_text(json.dumps([{"video_id": f"v{i}", "question": Q, "answer": "x", "id": i} for i in range(30)]))

  class Failing:
    def predict(self, items):
      return [None] * len(items)

  with caplog.at_level("WARNING"), pytest.raises(SystemExit) as e:   # nothing answered: the run failed
    run.main(["msvd_qa", "--ckpt", str(tmp_path), "--out", str(tmp_path / "p.jsonl"), "--gt-file", str(qfile),
              "--video-folder", str(tmp_path / "video"), "--no-progress"], predictor=Failing())
  out, err = capsys.readouterr()
  s = json.loads(out)
  assert (s["counts"]["missing_media"], s["counts"]["failed"]) == (20, 10)
  assert e.value.code == 1 and err == "error: no item was answered (10 failed, 20 without media; see the lines above)\n"
  missing = [r.message for r in caplog.records if "no media file" in r.message]
  assert len(missing) == 1 and missing[0].startswith("20 of 30 items have no media file, first 5: 1: ")
  failed = [r.message for r in caplog.records if "no answer" in r.message]
  assert len(failed) == 6 and failed[-1].startswith("10 items had no answer")


def test_a_cli_whose_main_returns_a_result_exits_0(capsys):
  """eval.judge / eval.score / eval.run return their summary for callers: `cli.run` exits 0
  (sys.exit(dict) would print the dict on stderr and exit 1)."""
  from llamavid_jax import cli
  for result, code in [({"accuracy": 1.0}, 0), ([1], 0), (None, 0), (0, 0), (3, 3), (True, 0)]:
    with pytest.raises(SystemExit) as e:
      cli.run(lambda: result)
    assert e.value.code == code, result
  assert capsys.readouterr().err == ""


def test_planning_names_five_skips_and_sums_up_the_rest(caplog):
  from llamavid_jax.data import plan as plan_lib
  from llamavid_jax.data.buckets import BucketKey
  from llamavid_jax.data.skips import Skip
  verdicts = {i: (Skip(i, f"s{i}", "missing_file", "video", "file not found", f"v{i}.mp4") if i % 100 < 98
                  else Skip(i, f"s{i}", "too_long", "conversations", "too long") if i % 100 == 98
                  else BucketKey("frames", 0)) for i in range(3000)}
  with caplog.at_level("WARNING", logger="llamavid_jax.data.plan"):
    plan_lib.log_skips(verdicts)
  lines = [r.getMessage() for r in caplog.records if r.name == "llamavid_jax.data.plan"]   # not a stray asyncio line
  assert lines[:5] == [f"skipped sample 's{i}' (index {i}) field 'video' (file v{i}.mp4): missing_file: file not "
                       "found" for i in range(5)]
  assert lines[5:] == ["2,970 of 3,000 samples skipped (missing_file 2,940, too_long 30), first 5 named above"]


def test_a_data_file_whose_every_sample_is_skipped_is_refused_before_training():
  """Fewer samples than `min_samples_for_skip_rate` (the rate bound waits for them): all skipped
  is still refused while planning, not found out as "the data ran out" after compiling."""
  from types import SimpleNamespace

  from llamavid_jax.data import DataError
  from llamavid_jax.data import pipeline as pl
  from llamavid_jax.data.skips import Skip
  skips = [Skip(i, str(i), "bad_conversations", "conversations", "expected a list") for i in range(3)]
  config = SimpleNamespace(max_skip_rate=0.01, min_samples_for_skip_rate=100)
  with pytest.raises(DataError, match=r"^every one of the 3 samples was skipped while planning; last: sample '2' "
                     r"\(index 2\) field 'conversations': bad_conversations: expected a list; by reason: "
                     r"\{'bad_conversations': 3\}$"):
    pl._check_plan_skips(config, pl.Plan([], skips, 3))
  pl._check_plan_skips(config, pl.Plan([], skips[:2], 3))   # one left: trains


def test_the_web_demo_refuses_nan_features_naming_the_upload(model, tmp_path):
  from eval import web
  feats = np.zeros((2, *model.cfg.feature_shape), np.float32)
  feats[0, 1, 2] = np.inf
  path = tmp_path / "up.npy"
  np.save(path, feats)
  before = digest(path)
  with pytest.raises(inference.MediaError, match=rf"^{path}: 1 of {feats.size:,} values are NaN or infinite$"):
    web._media_state(model, str(path))
  assert digest(path) == before


# the data layer's CLIs cannot import llamavid_jax.cli (pyproject's layers): they print their
# own `error: ...` line (features) or take only generated flags (synthetic)
OWN_ERRORS = {"llamavid_jax/cli.py", "llamavid_jax/data/features.py", "llamavid_jax/data/synthetic.py"}


def test_every_cli_ends_through_cli_run():
  import glob
  found = []
  for f in sorted(glob.glob(os.path.join(REPO, "*", "**", "*.py"), recursive=True)):
    rel = os.path.relpath(f, REPO)
    if rel.split(os.sep)[0] not in ("eval", "train", "llamavid_jax") or rel in OWN_ERRORS:
      continue
    text = open(f, encoding="utf-8").read()
    if '\nif __name__ == "__main__":' not in text:
      continue
    found.append(rel)
    block = text.rsplit('\nif __name__ == "__main__":', 1)[1]
    assert re.search(r"\b(cli\.)?run\(", block) and "cli" in block, f"{rel}: its __main__ does not use cli.run"
  assert {"eval/needle.py", "eval/serve.py", "eval/visualize.py", "llamavid_jax/quant.py",
          "llamavid_jax/extract.py", "llamavid_jax/export.py", "llamavid_jax/convert.py", "train/train.py"} <= set(found)


def test_quant_and_visualize_name_a_broken_checkpoint_in_one_line(tiny_ckpt, tmp_path, capsys):
  from eval import visualize
  from llamavid_jax import cli, quant
  good = os.path.join(tiny_ckpt, "inference")
  bad_cfg = tmp_path / "cfg"
  shutil.copytree(good, bad_cfg)
  (bad_cfg / "model_config.json").write_text('{"llm": {"nonexistent": 1}}')
  garbled = tmp_path / "meta"
  shutil.copytree(good, garbled)
  meta = next(os.path.join(d, f) for d, _, fs in os.walk(garbled / "params") for f in fs if f == "_METADATA")
  with open(meta, "w") as f:
    f.write("garbage{")
  before = digest(bad_cfg, garbled)
  with pytest.raises(inference.CheckpointError, match=rf"^{bad_cfg}/model_config.json: not a model config: TypeError"):
    visualize.checkpoint_config(str(bad_cfg))
  for ckpt, message in [(bad_cfg, f"{bad_cfg}/model_config.json: not a model config: TypeError"),
                        (garbled, f"{garbled}: corrupt or unreadable checkpoint")]:
    with pytest.raises(SystemExit) as e:
      cli.run(lambda: quant.main(["save", "--ckpt", str(ckpt), "--quant", "int8", "--out", str(tmp_path / "q")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith(f"error: {message}"), err
    assert "Traceback" not in "\n".join(err)
  assert digest(bad_cfg, garbled) == before and not (tmp_path / "q").exists()
