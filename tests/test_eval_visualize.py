"""`eval.visualize`: the context attention drawn over a clip's frames, one PNG; on arrays
(`render`), on the trained tiny checkpoint, and its refusals before the model loads."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from eval import overlay, visualize
from llamavid_jax import inference
from llamavid_jax.models import config as C
from tests import video_fixtures

pytest.importorskip("matplotlib")

QUESTION = "What is in the video?"


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB")).astype(np.int32)


def _assert_panels(png, pic, pictures):
  """Each panel box of the PNG holds its overlay picture (pixel for pixel, inside the edge)."""
  assert len(pic.panels) == len(pictures)
  for (l, t, r, b), want in zip(pic.panels, pictures):
    assert (r - l, b - t) == want.shape[1::-1]
    diff = np.abs(png[t + 1:b - 1, l + 1:r - 1] - want[1:-1, 1:-1].astype(np.int32))
    assert diff.mean() < 1 and diff.max() <= 8, (diff.mean(), diff.max())


def _runs(row: np.ndarray, colours: dict) -> list[str]:
  """A pixel row -> the names of the colour runs along it (other colours skipped)."""
  out = []
  for px in row:
    name = next((k for k, c in colours.items() if np.abs(px - c).max() <= 3), None)
    if name and (not out or out[-1] != name):
      out.append(name)
    elif name is None and out and out[-1] != "-":
      out.append("-")
  return [n for n in out if n != "-"]


def _hex(c: str) -> np.ndarray:
  return np.asarray([int(c[i:i + 2], 16) for i in (1, 3, 5)])


def test_render_draws_the_frames_captions_and_the_strip(tmp_path):
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
  logits = rng.normal(size=(5, 16)).astype(np.float32) * np.arange(1, 6, dtype=np.float32)[:, None]
  attn = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)     # 5 frames, 4 x 4 patches
  out = str(tmp_path / "sub" / "a.png")
  pic = visualize.render(frames, attn, [0, 2, 4], [0.0, 1.0, 2.0, 3.0, 4.0], question="Where is it?", out=out,
                         answer="There.", alpha=0.4)
  png = _png(out)
  assert png.shape == (pic.size[1], pic.size[0], 3) and pic.frames == [0, 2, 4]
  _assert_panels(png, pic, overlay.overlay(frames, attn[[0, 2, 4]], alpha=0.4))
  assert len({t for _, t, _, _ in pic.panels}) == 1                     # 3 frames: one row
  (_, t, r0, b), (l1, _, _, _) = pic.panels[:2]
  assert (png[t:b, r0 + 2:l1 - 2] == 255).all()                         # white between the panels
  stat = overlay.peak_ratio(attn)
  np.testing.assert_array_equal(pic.strip, stat)
  assert pic.captions == [f"{i:.1f} s · peak {stat[i]:.1f}×" for i in (0, 2, 4)]
  assert pic.title[0] == "Q: Where is it?" and pic.title[1] == "A (greedy): There."
  l, t, r, b = pic.strip_box
  bars = _runs(png[b - 3, l:r], {"dark": _hex(visualize.DARK), "light": _hex(visualize.LIGHT)})
  assert bars == ["dark", "light", "dark", "light", "dark"], bars       # one bar per model frame

  pic = visualize.render(frames[:1], attn[:1], [0], [None], question="What?", out=out)
  assert pic.captions == [f"image · peak {stat[0]:.1f}×"] and len(pic.panels) == 1
  assert _png(out).shape == (pic.size[1], pic.size[0], 3)
  with pytest.raises(ValueError, match="2 frames for 1 shown"):
    visualize.render(frames[:2], attn, [0], [0.0] * 5, question="q", out=out)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
  return inference.load(os.path.join(tiny_ckpt, "inference"))


@pytest.mark.slow   # the shared tiny training run
def test_the_cli_draws_the_models_frames_and_attention(model, tiny_ckpt, tmp_path, monkeypatch, capsys):
  from llamavid_jax.data.image import frames_to_uint8
  from llamavid_jax.data.video import load_video
  monkeypatch.setattr(inference, "load", lambda *a, **k: model)     # loaded once for the module
  # a model that samples as the demo's training data: every frame, capped at 4 (evenly spread)
  monkeypatch.setattr(model, "video_fps", None)
  monkeypatch.setattr(model, "sample_cap", 4)
  clip = video_fixtures.write_counter_clip(str(tmp_path / "clip.mp4"), 60, 10)
  out = str(tmp_path / "att.png")
  ckpt = os.path.join(tiny_ckpt, "inference")   # its config is read; the model is `model`
  pic = visualize.main(["--ckpt", ckpt, "--video", clip, "--question", QUESTION, "--out", out,
                        "--frames", "3", "--answer", "--max-new-tokens", "6"])
  assert "wrote" in capsys.readouterr().out
  raw, info = load_video(clip, fps=model.video_fps, max_frames=model.sample_cap)
  assert len(raw) == 4 and pic.frames == [0, 2, 3]
  media = model.media(video=clip)
  req = model.request(QUESTION, media)
  attn = model.context_attention(req)
  np.testing.assert_allclose(pic.strip, overlay.peak_ratio(attn), rtol=1e-6)
  assert [c.split(" · ")[0] for c in pic.captions] == [f"{float(info['timestamps'][i]):.1f} s" for i in (0, 2, 3)]
  [ans] = model.generate([req], max_new_tokens=6, temperature=0.0)
  assert f"A (greedy): {ans.text}".startswith(pic.title[1]) and ans.text
  png = _png(out)
  assert png.shape == (pic.size[1], pic.size[0], 3)
  _assert_panels(png, pic, overlay.overlay(frames_to_uint8(raw[[0, 2, 3]], size=224), attn[[0, 2, 3]]))

  img = tmp_path / "still.png"
  Image.fromarray(video_fixtures.counter_frame(5)).save(img)
  pic = visualize.main(["--ckpt", ckpt, "--image", str(img), "--question", "What is this?", "--out", out])
  attn = model.context_attention(model.request("What is this?", model.media(image=str(img))))
  assert pic.frames == [0] and pic.captions == [f"image · peak {overlay.peak_ratio(attn)[0]:.1f}×"]
  assert len(pic.title) == 2   # the question and the colour scale: no --answer


@pytest.mark.slow
def test_a_content_only_model_is_refused(model, tmp_path):
  from llamavid_jax.checkpoint import orbax_io
  content = inference.Model(orbax_io.Inference(dataclasses.replace(model.cfg, use_context_token=False),
                                               model.params, model.tokenizer, model.qtokenizer, model.meta))
  clip = video_fixtures.write_counter_clip(str(tmp_path / "clip.mp4"), 20, 10)
  assert content.context_attention(content.request(QUESTION, content.media(video=clip))) is None
  with pytest.raises(visualize.NoContextToken, match="content-only model .* no context attention to draw"):
    visualize.visualize(content, video=clip, question=QUESTION, out=str(tmp_path / "a.png"), ckpt="ck")
  assert not os.path.exists(tmp_path / "a.png")


def _ckpt_dir(path, cfg, train_workdir=False):
  """A checkpoint directory holding only its model config (enough for the checks made
  before loading): a converted / inference directory's, or a train WORKDIR's."""
  os.makedirs(path)
  if train_workdir:
    os.makedirs(os.path.join(path, "checkpoints"))
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({"model": C.to_dict(cfg)}, f)
  else:
    with open(os.path.join(path, "model_config.json"), "w") as f:
      json.dump(C.to_dict(cfg), f)
  return str(path)


@pytest.fixture
def no_load(monkeypatch):
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("loaded a model"))


@pytest.mark.parametrize("train_workdir", [False, True])
def test_a_content_only_checkpoint_is_refused_before_it_loads(train_workdir, tiny_cfg, tmp_path, no_load):
  ckpt = _ckpt_dir(tmp_path / "ck", dataclasses.replace(tiny_cfg, use_context_token=False), train_workdir)
  clip = video_fixtures.write_counter_clip(str(tmp_path / "clip.mp4"), 10, 10)
  with pytest.raises(SystemExit) as e:
    visualize.main(["--ckpt", ckpt, "--video", clip, "--question", QUESTION, "--out", str(tmp_path / "a.png")])
  assert str(e.value) == (f"error: {ckpt}: a content-only model (use_context_token=False) has no "
                          "context token, so there is no context attention to draw")


def test_help_describes_the_picture(capsys):
  with pytest.raises(SystemExit) as e:
    visualize.main(["--help"])
  out = capsys.readouterr().out
  assert e.value.code == 0 and out.startswith("usage: python -m eval.visualize")
  assert "PEAK RATIO" in out and "--frames" in out and "--answer" in out


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --ckpt"),
    (["--video", "{clip}", "--image", "{img}"], "argument --image: not allowed with argument --video"),
    (["--video", "{clip}", "--frames", "0"], "--frames must be >= 1, got 0"),
    (["--video", "{clip}", "--alpha", "1.5"], "--alpha must be in [0, 1], got 1.5"),
    (["--video", "{clip}", "--question", " "], "--question is empty"),
    (["--video", "{clip}", "--out", "{tmp}/a.jpg"], "--out {tmp}/a.jpg: the picture is a PNG"),
    (["--video", "{clip}", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--video", "{tmp}/none.mp4"], "--video {tmp}/none.mp4: no such file"),
    (["--image", "{tmp}/none.png"], "--image {tmp}/none.png: no such file"),
    (["--video", "{clip}", "--ckpt", "{tmp}/nodir"], "--ckpt {tmp}/nodir: no such directory"),
])
def test_bad_flags_are_named_before_the_model_loads(argv, message, tiny_cfg, tmp_path, capsys, no_load):
  ckpt = _ckpt_dir(tmp_path / "ck", tiny_cfg)
  subs = dict(clip=video_fixtures.write_counter_clip(str(tmp_path / "c.mp4"), 10, 10), img=str(tmp_path / "i.png"),
              tmp=str(tmp_path))
  Image.fromarray(video_fixtures.counter_frame(1)).save(subs["img"])
  base = ["--ckpt", ckpt, "--question", QUESTION, "--out", str(tmp_path / "a.png")] if argv else []
  with pytest.raises(SystemExit) as e:
    visualize.main(base + [a.format(**subs) for a in argv])
  assert e.value.code == 2 and message.format(**subs) in capsys.readouterr().err


@pytest.mark.parametrize("flag, name", [("--video", "notes.mp4"), ("--image", "notes.png")])
def test_bad_media_is_named_before_the_model_loads(flag, name, tiny_cfg, tmp_path, no_load):
  ckpt = _ckpt_dir(tmp_path / "ck", tiny_cfg)
  bad = tmp_path / name
  bad.write_text("a text file, not media")
  with pytest.raises(SystemExit) as e:
    visualize.main(["--ckpt", ckpt, flag, str(bad), "--question", QUESTION, "--out", str(tmp_path / "a.png")])
  assert str(e.value).startswith(f"error: {flag} {bad}: "), e.value
  assert ("unreadable_video" if flag == "--video" else "unreadable_image") in str(e.value)
