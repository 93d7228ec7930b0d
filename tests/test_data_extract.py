"""`python -m llamavid_jax.extract`: movies -> 1-fps ViT features + subtitle-interleaved `inputs`, as the
release's extract_video_features_subtitles.py: features equal to the model's ViT, the
release's subtitle placement on .srt / .vtt files, a folder that resumes after a kill,
broken videos named and counted."""

import contextlib
import logging
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from llamavid_jax import extract, inference
from llamavid_jax.checkpoint import orbax_io
from llamavid_jax.data import features as ft
from llamavid_jax.data import subtitles as subs
from llamavid_jax.data.image import frames_to_uint8, preprocess_frames
from llamavid_jax.data.video import load_video
from llamavid_jax.models import LlamaVid
from tests import data_fixtures as fx
from tests.video_fixtures import write_counter_clip

SRT = """\ufeff1
00:00:00,500 --> 00:00:01,500
<i>Hello</i>

2
00:00:01,000 --> 00:00:01,200
there...

3
00:00:02,000 --> 00:00:03,000
{\\an8}multi
line

4
00:00:03,000 --> 00:00:03,001
Boundary
5
00:00:00,100 --> 00:00:00,900
Early, listed late
"""

VTT = """WEBVTT - a movie
Kind: captions

NOTE two lines
of notes

STYLE
::cue { color: yellow }

intro
00:00.500 --> 00:01.500 align:start position:10%
<v Bob>Hello</v> &amp; <c.yellow>bye</c>

00:02.000 --> 00:09.000
<00:00:02.500>late &lt;image&gt; text
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny random model's inference directory (`orbax_io.save_inference`); the weights
  drawn in numpy from the parameter shapes (no init run), LayerNorm scales near 1."""
  root = tmp_path_factory.mktemp("extract")
  cfg = tiny.model_config()
  rng = np.random.default_rng(0)
  shapes = jax.tree_util.tree_flatten_with_path(nn.unbox(orbax_io.abstract_params(cfg)))
  leaves = [rng.normal(float("scale" in jax.tree_util.keystr(k)), 0.1, s.shape).astype(s.dtype) for k, s in shapes[0]]
  params = jax.tree.unflatten(shapes[1], leaves)
  out = str(root / "inference")
  orbax_io.save_inference(out, params, cfg, {"source": "test"}, fx.make_llm_tokenizer(str(root / "llm")),
                          fx.make_bert_tokenizer(str(root / "bert")), exact_vocab=False)
  return out


_LOADED = {}


@pytest.fixture(autouse=True)
def load_once(monkeypatch):
  """Each CLI run loads the checkpoint (`inference.load`, tested in test_inference_dir);
  here the loaded model is shared between runs."""
  real = inference.load

  def load(ckpt, **kw):
    key = (ckpt, tuple(sorted(kw.items())))
    if key not in _LOADED:
      _LOADED[key] = real(ckpt, **kw)
    return _LOADED[key]

  monkeypatch.setattr(inference, "load", load)


def _clip(path, n=10, rate=2):
  """n counter frames at `rate` fps: at 1 fps, frames 0, rate, 2 * rate, ... (times 0, 1, 2, ... s)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return write_counter_clip(str(path), n, rate)


def _write(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def _extract(*args):
  return extract.main([*map(str, args)])


_VIT = jax.jit(lambda model, p, x: model.apply({"params": p}, x, method=lambda mod, x: mod.vit(x)), static_argnums=0)


def _vit(ckpt, frames):
  """The model's ViT on float32[T, S, S, 3] frames, float32, one unsharded call."""
  m = inference.load(ckpt)
  return np.asarray(_VIT(m.model, m.params, frames), np.float32)


# ---- subtitles ---------------------------------------------------------------------------


def test_srt_and_vtt_parse():
  assert subs.parse_subtitles(SRT, "a.srt") == [
      subs.Cue(0.5, 1.5, "Hello"), subs.Cue(1.0, 1.2, "there"), subs.Cue(2.0, 3.0, "multi line"),
      subs.Cue(3.0, 3.001, "Boundary"), subs.Cue(0.1, 0.9, "Early, listed late")]
  assert subs.parse_subtitles(VTT, "a.vtt") == [subs.Cue(0.5, 1.5, "Hello & bye"),
                                                subs.Cue(2.0, 9.0, "late  text")]
  assert subs.parse_time("01:02:03,4") == 3723.4 and subs.parse_time("02:03.250") == 123.25
  for bad, why in [("1\n00:00:01,000 --> 00:00:0x,000\nHi\n", "line 2: cannot read the timing line"),
                   ("1\n00:00:02,000 --> 00:00:01,000\nHi\n", "line 2: the cue ends"),
                   ("Hello\n\n1\n00:00:01,000 --> 00:00:02,000\nHi\n", "line 1: text before the first cue"),
                   ("WEBVTT\n\nNOTE nothing\n", "no subtitle cue")]:
    with pytest.raises(subs.SubtitleError, match=why) as e:
      subs.parse_subtitles(bad, "bad.srt")
    assert e.value.path == "bad.srt" and e.value.reason == "bad_subtitles"


def test_placement_is_the_releases_rule():
  """After the last frame shown before the line ends (frame_time < end, strictly), with the
  release's pointer that never moves back (a cue listed after a later-ending one stays)."""
  times = [0.0, 1.0, 2.0, 3.0, 4.0]
  cue = lambda end, text: subs.Cue(0.0, end, text)
  assert subs.frame_texts([cue(1.5, "a"), cue(1.2, "b"), cue(3.0, "c"), cue(3.001, "d"), cue(0.9, "e"),
                           cue(99, "f")], times) == [[], ["a", "b"], ["c"], ["d", "e"], ["f"]]
  # a cue ending at 0 s passes no frame: here on frame 0 (the release's text_list[-1]: the last frame)
  assert subs.frame_texts([cue(0.0, "ends at 0"), cue(1.0, "on 0")], times)[0] == ["ends at 0", "on 0"]
  assert subs.movie_inputs([cue(0.5, "x"), cue(0.7, "y")], [0.0, 1.0]) == "<image>x y<image>"


def test_subtitles_are_placed_in_the_stored_inputs(ckpt, tmp_path):
  video = _clip(tmp_path / "v" / "movie.mp4", n=10, rate=2)   # 5 frames at 0, 1, 2, 3, 4 s
  srt, vtt = _write(tmp_path / "movie.srt", SRT), _write(tmp_path / "movie.vtt", VTT)
  assert _extract("--ckpt", ckpt, "--video", video, "--subtitles", srt, "--out", tmp_path / "srt") == 0
  got = ft.read_movie(str(tmp_path / "srt" / "movie.safetensors"))
  assert got.inputs == "<image><image>Hello there<image>multi line<image>Boundary Early, listed late<image>"
  os.makedirs(tmp_path / "subs")
  os.replace(vtt, tmp_path / "subs" / "movie.vtt")
  assert _extract("--ckpt", ckpt, "--video-dir", tmp_path / "v", "--subtitle-dir", tmp_path / "subs",
                  "--out", tmp_path / "vtt") == 0
  got_vtt = ft.read_movie(str(tmp_path / "vtt" / "movie.safetensors"))
  assert got_vtt.inputs == "<image><image>Hello & bye<image><image><image>late  text"
  assert got_vtt.feats.tobytes() == got.feats.tobytes()


# ---- features ----------------------------------------------------------------------------


@contextlib.contextmanager
def vit_compiles():
  """The compiles of extract's ViT step inside the block (jax.log_compiles logs
  "Compiling jit(_vit) ..." once per compile, cache hits not)."""
  compiles, handler = [], logging.Handler()
  handler.emit = lambda r: compiles.append(r.getMessage()) if r.getMessage().startswith("Compiling jit(_vit)") else None
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield compiles
  finally:
    logging.getLogger("jax").removeHandler(handler)


def test_features_are_the_models_vit_rounded_once(ckpt, tmp_path):
  """20 frames in steps of 8 over the 8 devices (the last zero-padded), one frame a device:
  bitwise the model's float32 ViT frame by frame, rounded once to float16 / bfloat16, and
  one compile for all steps. (XLA's CPU kernels round differently for another batch size:
  all 20 frames in one call agree to ~1e-6 relative.)"""
  video = _clip(tmp_path / "long.mp4", n=40, rate=2)
  frames = preprocess_frames(load_video(video, fps=1.0)[0], size=28)
  ref = np.concatenate([_vit(ckpt, frames[t: t + 1]) for t in range(len(frames))])
  assert ref.shape == (20, 5, 32)
  np.testing.assert_allclose(ref, _vit(ckpt, frames), rtol=1e-5, atol=1e-5)
  with vit_compiles() as compiles:
    assert _extract("--ckpt", ckpt, "--video", video, "--out", tmp_path / "f16", "--batch-size", "5") == 0
    got = ft.read_movie(str(tmp_path / "f16" / "long.safetensors"))
    assert got.feats.dtype == np.float16 and got.inputs == "<image>" * 20
    assert got.feats.astype(np.float32).tobytes() == ref.astype(np.float16).astype(np.float32).tobytes()

    ex = extract.Extractor(inference.load(ckpt), batch_size=5)
    assert ex.batch == 8 and ex.mesh.devices.size == jax.device_count() == 8
    crops = frames_to_uint8(load_video(video)[0], size=28)
    bf16 = ex.features(crops, np.dtype(ml_dtypes.bfloat16))
    assert bf16.dtype == ml_dtypes.bfloat16 and bf16.tobytes() == ref.astype(ml_dtypes.bfloat16).tobytes()
    assert ex.features(crops[:3], np.float32).tobytes() == ref[:3].tobytes()
  assert len(compiles) == 1, compiles


def test_bfloat16_files_read_back_without_jax(ckpt, tmp_path):
  video = _clip(tmp_path / "b.mp4", n=4, rate=2)
  assert _extract("--ckpt", ckpt, "--video", video, "--out", tmp_path, "--dtype", "bfloat16") == 0
  code = ("import sys; from llamavid_jax.data import features as ft; m = ft.read_movie(sys.argv[1]); "
          "assert 'jax' not in sys.modules; print(m.feats.dtype, m.feats.shape, m.inputs)")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.safetensors")], capture_output=True,
                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "bfloat16 (2, 5, 32) <image><image>"


def test_decoding_with_a_transform_gives_the_same_crops(tmp_path):
  video = _clip(tmp_path / "c.mp4", n=60, rate=10)
  want = frames_to_uint8(load_video(video)[0], size=28)
  for seek in (False, True):
    got, info = load_video(video, seek=seek, transform=lambda f: frames_to_uint8(f[None], size=28)[0])
    assert got.tobytes() == want.tobytes() and info["indices"] == [0, 10, 20, 30, 40, 50]


# ---- folders -----------------------------------------------------------------------------


def test_a_killed_folder_resumes_and_re_extraction_is_bitwise_equal(ckpt, tmp_path, monkeypatch, capsys):
  for name in ("a", "b", "c"):
    _clip(tmp_path / "movies" / f"{name}.mp4", n=6 + 2 * (name == "b"), rate=2)
  out = tmp_path / "out"
  real, calls = ft.write_safetensors, []

  def killed_on_the_second(path, movie):
    calls.append(path)
    if len(calls) == 2:   # a kill mid-write: a partial temporary file of a process now gone
      _write(path + ".tmp99999999", "partial")
      raise KeyboardInterrupt
    real(path, movie)

  monkeypatch.setattr(ft, "write_safetensors", killed_on_the_second)
  with pytest.raises(KeyboardInterrupt):
    _extract("--ckpt", ckpt, "--video-dir", tmp_path / "movies", "--out", out)
  assert sorted(os.listdir(out)) == ["a.safetensors", "b.safetensors.tmp99999999"]
  first = (out / "a.safetensors").read_bytes()

  monkeypatch.setattr(ft, "write_safetensors", real)
  capsys.readouterr()
  assert _extract("--ckpt", ckpt, "--video-dir", tmp_path / "movies", "--out", out) == 0
  printed = capsys.readouterr().out
  assert f"skipped {tmp_path / 'movies' / 'a.mp4'} ({out / 'a.safetensors'} exists)" in printed
  assert printed.strip().splitlines()[-1] == "3 videos: extracted 2, skipped 1 (exists), failed 0"
  assert sorted(os.listdir(out)) == ["a.safetensors", "b.safetensors", "c.safetensors"]
  assert ft.read_movie(str(out / "b.safetensors")).num_frames == 4

  os.remove(out / "a.safetensors")   # extracted again: the same bytes
  assert _extract("--ckpt", ckpt, "--videos", _write(tmp_path / "list.txt", f"# movies\n{tmp_path}/movies/a.mp4\n\n"),
                  "--out", out) == 0
  assert (out / "a.safetensors").read_bytes() == first
  # every output already there: nothing to do, the model is never loaded
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("the model was loaded"))
  assert _extract("--ckpt", ckpt, "--video-dir", tmp_path / "movies", "--out", out) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1] == "3 videos: extracted 0, skipped 3 (exists), failed 0"


def test_broken_videos_and_subtitles_are_named_and_counted(ckpt, tmp_path, capsys):
  d, sd = tmp_path / "movies", tmp_path / "subs"
  _clip(d / "good.mp4")
  _clip(d / "badsubs.mp4")
  _write(d / "garbage.mp4", "not a video")
  (d / "empty.mkv").write_bytes(b"")
  os.makedirs(sd)
  for name in ("good", "garbage", "empty"):
    _write(sd / f"{name}.srt", SRT)
  _write(sd / "badsubs.vtt", "WEBVTT\n\n00:01.000 --> soon\nHi\n")
  assert _extract("--ckpt", ckpt, "--video-dir", d, "--subtitle-dir", sd, "--out", tmp_path / "out") == 1
  printed = capsys.readouterr().out
  lines = {line.split(" ")[1].rstrip(":"): line for line in printed.strip().splitlines()[:-1]}
  assert lines[str(d / "badsubs.mp4")].startswith(f"FAILED {d / 'badsubs.mp4'}: {sd / 'badsubs.vtt'}: bad_subtitles: "
                                                  "line 3: cannot read the timing line")
  assert "unreadable_video" in lines[str(d / "garbage.mp4")] and "unreadable_video" in lines[str(d / "empty.mkv")]
  assert lines[str(d / "good.mp4")].startswith(f"extracted {d / 'good.mp4'} -> ")
  assert printed.strip().splitlines()[-1] == "4 videos: extracted 1, skipped 0 (exists), failed 3"
  assert os.listdir(tmp_path / "out") == ["good.safetensors"]
  assert ft.read_movie(str(tmp_path / "out" / "good.safetensors")).inputs.startswith("<image><image>Hello there")


def test_missing_subtitles_fail_that_video(ckpt, tmp_path, capsys):
  _clip(tmp_path / "m" / "x.mp4")
  os.makedirs(tmp_path / "s")
  assert _extract("--ckpt", ckpt, "--video-dir", tmp_path / "m", "--subtitle-dir", tmp_path / "s",
                  "--out", tmp_path / "o") == 1
  assert f"missing_subtitles: no subtitle file ({tmp_path / 's' / 'x.srt'} or {tmp_path / 's' / 'x.vtt'})" in \
      capsys.readouterr().out


@pytest.mark.parametrize("case,why", [
    ("no_ckpt", "--ckpt {t}/nope: no such directory"),
    ("not_ckpt", "neither a converted / inference directory"),
    ("subtitles_for_a_folder", "--subtitles is for one --video"),
    ("missing_subtitles", "--subtitles {t}/nope.srt: no such file"),
    ("same_stem", "would both be written to {t}/out/x.safetensors"),
    ("empty_list", "--videos {t}/list.txt: no video paths"),
    ("no_videos", "--video-dir {t}/empty: no video files"),
    ("batch", "--batch-size 0: must be at least 1"),
])
def test_bad_arguments_stop_before_the_model_is_loaded(ckpt, tmp_path, monkeypatch, capsys, case, why):
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("the model was loaded"))
  v = _clip(tmp_path / "x.mp4", n=2)
  os.makedirs(tmp_path / "empty")
  args = {"no_ckpt": ["--ckpt", tmp_path / "nope", "--video", v],
          "not_ckpt": ["--ckpt", tmp_path / "empty", "--video", v],
          "subtitles_for_a_folder": ["--ckpt", ckpt, "--videos", _write(tmp_path / "l", f"{v}\n{v}.mp4\n"),
                                     "--subtitles", _write(tmp_path / "s.srt", SRT)],
          "missing_subtitles": ["--ckpt", ckpt, "--video", v, "--subtitles", tmp_path / "nope.srt"],
          "same_stem": ["--ckpt", ckpt, "--videos", _write(tmp_path / "l2", f"{v}\n{tmp_path}/empty/x.mp4\n")],
          "empty_list": ["--ckpt", ckpt, "--videos", _write(tmp_path / "list.txt", "# nothing\n\n")],
          "no_videos": ["--ckpt", ckpt, "--video-dir", tmp_path / "empty"],
          "batch": ["--ckpt", ckpt, "--video", v, "--batch-size", 0]}[case]
  assert _extract(*args, "--out", tmp_path / "out") == 2
  assert why.format(t=tmp_path) in capsys.readouterr().err


def test_the_old_data_command_names_the_new_one(capsys):
  """`data.features` hosts no command that loads a checkpoint: its old `extract` says where it went."""
  assert ft.main(["extract", "--ckpt", "my dir", "--video", "a.mp4"]) == 2
  assert capsys.readouterr().err.strip() == "error: `extract` moved: python -m llamavid_jax.extract --ckpt 'my dir' --video a.mp4"
