"""The web demo (`eval.web`) served on localhost and driven through gradio_client, on a
trained tiny checkpoint; the attention overlay (`eval.overlay`) on its own."""

import os
import re
import socket
import time

import numpy as np
import pytest

from eval import overlay
from tests import video_fixtures

TIMEOUT = 120   # seconds for any one request to the demo
# gradio 6.31 calls pandas 3 options that pandas deprecates (its queue, not ours)
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def _text(msg):
  return "".join(part["text"] for part in msg["content"]) if isinstance(msg["content"], list) else msg["content"]


@pytest.fixture(scope="module")
def demo(tiny_ckpt):
  """(model, gradio_client.Client) of the demo over `tiny_ckpt` with an upload cap of 4 frames."""
  pytest.importorskip("gradio")
  from gradio_client import Client

  from eval import web
  from llamavid_jax import inference
  m = inference.load(tiny_ckpt, max_frames=4)
  eng = web.make_engine(m, slots=4)
  app = web.build_app(m, 4, engine=eng)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
  try:
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    client.engine, client.url = eng, f"http://127.0.0.1:{port}/"
    yield m, client
  finally:
    app.close()
    eng.close()


def _ask(client, question, history, *, max_new_tokens, temperature=0.0):
  """-> (every streamed output, the last one) of one question."""
  job = client.submit(question, history, temperature, 0.7, max_new_tokens, api_name="/ask")
  final = job.result(timeout=TIMEOUT)
  # gradio_client lists a transport error of its stream (httpx RemoteProtocolError, seen
  # under a loaded CI machine) among the outputs; the final result above is checked whole
  outputs = [o for o in job.outputs() if not isinstance(o, BaseException)]
  assert outputs, job.outputs()
  return outputs, final


@pytest.mark.slow   # trains the tiny checkpoint (~25 s) unless another test did
def test_an_upload_and_two_questions_stream_the_greedy_answers(demo, tmp_path):
  from gradio_client import handle_file
  m, client = demo
  clip = video_fixtures.write_counter_clip(str(tmp_path / "clip.mp4"), 30, 10)   # 3 frames at 1 fps
  status, chat, gallery = client.predict(handle_file(clip), api_name="/upload")
  assert status == "`clip.mp4`: video, 3 frames at 1 fps. Ask a question." and chat == [] and gallery == []

  media = m.media(video=clip)
  history, turns = [], []
  for question in ("What is in the video?", "And then? "):   # a trailing space is kept, as typed
    t0 = time.time()
    outputs, (history, box, gallery, status) = _ask(client, question, history, max_new_tokens=12)
    turns.append(question)
    [want] = m.generate([m.request(turns, media)], max_new_tokens=12, temperature=0)
    turns.append(want.text)
    assert want.text and [_text(h) for h in history[-2:]] == [question, want.text], (history, want)
    assert [h["role"] for h in history] == ["user", "assistant"] * (len(turns) // 2)
    assert box == "" and status == f"`clip.mp4`: answered in {len(want.token_ids)} tokens."
    # the pictures are sent with the first and last outputs only, as the same cached files
    # (re-sent with every token, gradio rewrote them under a client still reading them)
    assert all(o[2] == {"__type__": "update"} for o in outputs[1:-1]), [o[2] for o in outputs]
    assert [g["image"] for g in outputs[0][2]] == [g["image"] for g in gallery], (outputs[0][2], gallery)
    partial = [_text(o[0][-1]) for o in outputs]    # the answer as it grew
    assert partial[0] == "" and len(set(partial)) > 2 and all(want.text.startswith(p) for p in partial), partial
    assert [g["caption"].split(" · ")[0] for g in gallery] == ["0 s", "1 s", "2 s"], gallery
    assert all(re.fullmatch(r"\d s · peak \d+\.\d×", g["caption"]) for g in gallery), gallery
    print(f"WEB {question!r} -> {want.text!r} ({len(outputs)} outputs, {time.time() - t0:.1f} s)")

  assert client.predict(api_name="/clear") == ([], "", [], "`clip.mp4`: new conversation.")


@pytest.mark.slow
def test_bad_uploads_get_a_message_and_the_server_goes_on(demo, tmp_path):
  from gradio_client import handle_file
  m, client = demo
  bad = tmp_path / "notes.mp4"
  bad.write_text("a text file, not a video")
  status, chat, gallery = client.predict(handle_file(str(bad)), api_name="/upload")
  assert status.startswith("**Cannot use `notes.mp4`**: ") and "unreadable_video" in status, status
  assert str(tmp_path) not in status and "/gradio" not in status   # no server-side path

  history, box, _, status = client.predict("Hello?", [], 0.0, 0.7, 8, api_name="/ask")
  assert (history, box, status) == ([], "Hello?", "Upload a video or an image first.")

  long = video_fixtures.write_counter_clip(str(tmp_path / "long.mp4"), 50, 10)   # 5 frames at 1 fps > 4
  status, _, _ = client.predict(handle_file(long), api_name="/upload")
  assert status == "**Cannot use `long.mp4`**: 5 frames at 1 fps, more than the cap of 4", status

  img = tmp_path / "still.png"
  from PIL import Image
  Image.fromarray(video_fixtures.counter_frame(5)).save(img)
  status, _, _ = client.predict(handle_file(str(img)), api_name="/upload")
  assert status == "`still.png`: image. Ask a question."
  _, (history, _, gallery, status) = _ask(client, "What is this?", [], max_new_tokens=6)
  [want] = m.generate([m.request(["What is this?"], m.media(image=str(img)))], max_new_tokens=6, temperature=0)
  assert _text(history[-1]) == want.text and want.text
  assert [g["caption"].split(" · ")[0] for g in gallery] == ["image"]

  history, box, _, status = client.predict("", [], 0.0, 0.7, 8, api_name="/ask")
  assert status == "Type a question." and history == []


@pytest.mark.slow
def test_two_users_at_once_a_clip_and_a_movie_get_their_greedy_answers_in_one_batch(demo, tmp_path, monkeypatch):
  """Two gradio_client sessions (two browser users), one asking about a clip and one
  about a movie feature file (the release's long-video mode), each twice: their
  questions wait for each other in the engine's queue (so the page must pass them on at
  once: a demo serving one at a time never fills it) and decode in one batch; each gets
  Model.generate's greedy answer with its own conversation."""
  from gradio_client import Client, handle_file

  from configs import tiny
  from llamavid_jax.data.features import Movie, write_safetensors
  m, first = demo
  eng = first.engine
  clip = video_fixtures.write_counter_clip(str(tmp_path / "clip.mp4"), 30, 10)
  vision = tiny.model_config().vision
  feats = np.random.default_rng(3).standard_normal((3, vision.num_tokens, vision.width)).astype(np.float16)
  movie = str(tmp_path / "movie.safetensors")
  write_safetensors(movie, Movie(feats, "<image>Hello...<image><image>A dog runs."))
  users = {"clip": (first, clip), "movie": (Client(first.url, verbose=False), movie)}
  assert users["clip"][0].session_hash != users["movie"][0].session_hash
  status = users["movie"][0].predict(handle_file(movie), api_name="/upload")[0]
  assert status.startswith("`movie.safetensors`: a movie, features of 3 frames with subtitles"), status
  assert users["clip"][0].predict(handle_file(clip), api_name="/upload")[0].startswith("`clip.mp4`: video")

  met = []   # admits nothing until both questions wait (at most 60 s): then both start at one step
  admit = eng._admit_waiting

  def both_then_admit():
    if len(eng._queue) < 2 and len(met) < 600:
      met.append(False)
      time.sleep(0.1)
      return
    met.append(len(eng._queue) == 2)
    monkeypatch.setattr(eng, "_admit_waiting", admit)
    admit()

  histories = {k: [] for k in users}
  for question in ("What is in the video?", "And then? "):   # a trailing space is kept, as typed
    met.clear()
    steps, busy = eng.steps, eng.busy_row_steps
    monkeypatch.setattr(eng, "_admit_waiting", both_then_admit)
    jobs = {k: client.submit(question, histories[k], 0.0, 0.7, 10, api_name="/ask") for k, (client, _) in users.items()}
    for k, (client, path) in users.items():
      histories[k], _, _, status = jobs[k].result(timeout=TIMEOUT)
      turns = [_text(h) for h in histories[k]]
      [want] = m.generate([m.request(turns[:-1], m.media(**{"video" if k == "clip" else "features": path}))],
                          max_new_tokens=10, temperature=0)
      assert want.text and turns[-1] == want.text, (k, turns, want)
      assert status == f"`{os.path.basename(path)}`: answered in {len(want.token_ids)} tokens.", status
      print(f"WEB {k} {question!r} -> {want.text!r}")
    assert met and met[-1], "the two questions never waited in the engine's queue together"
    assert eng.busy_row_steps - busy > eng.steps - steps   # some step decoded both
  assert eng.slots_in_use == 0 and eng.queue_depth == 0


@pytest.mark.slow
def test_a_user_who_cancels_mid_answer_frees_the_slot(demo, tmp_path, monkeypatch):
  from gradio_client import handle_file
  m, client = demo
  eng = client.engine
  take, before = eng._take, eng.finished["cancelled"]

  word = m.tokenizer.encode("video", add_special_tokens=False)[-1]

  def slow_take(h, toks):   # 0.5 s a decode dispatch, and no </s>: the answer (its budget cut to the model's
    time.sleep(0.5)         # positions, tens of dispatches) is still running when the cancel arrives
    return take(h, [word if t == eng.eos_id else t for t in toks])

  monkeypatch.setattr(eng, "_take", slow_take)
  clip = video_fixtures.write_counter_clip(str(tmp_path / "clip.mp4"), 30, 10)
  client.predict(handle_file(clip), api_name="/upload")
  job = client.submit("What is in the video?", [], 0.0, 0.7, 400, api_name="/ask")
  deadline = time.monotonic() + TIMEOUT   # bounds on the waits, not timing assertions
  while not eng.slots_in_use and time.monotonic() < deadline:
    time.sleep(0.05)
  assert eng.slots_in_use == 1
  job.cancel()
  while eng.slots_in_use and time.monotonic() < deadline:
    time.sleep(0.05)
  assert eng.slots_in_use == 0 and eng.finished["cancelled"] == before + 1


def test_overlay_colours_the_attended_patch():
  frames = np.full((2, 28, 56, 3), 100, np.uint8)     # 2 frames, a 2 x 2 patch grid upsampled to 28 x 56
  attn = np.asarray([[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]], np.float32)
  hot, flat = overlay.overlay(frames, attn)
  assert hot.shape == flat.shape == (28, 56, 3) and hot.dtype == np.uint8
  assert hot[0, 0].tolist() == [114, 50, 50]           # weight 1: jet's dark red, half blended
  assert hot[27, 55].tolist() == [50, 50, 114]         # weight 0: dark blue
  assert (flat == flat[0, 0]).all()                    # uniform: one colour (the scale's 0.25 point)
  assert flat[0, 0].tolist() == [50, 114, 178]
  np.testing.assert_allclose(overlay.peak_ratio(attn), [4, 1])
  assert overlay.shown_frames(3).tolist() == [0, 1, 2] and overlay.shown_frames(0).tolist() == []
  assert overlay.shown_frames(100, 16)[[0, -1]].tolist() == [0, 99] and len(overlay.shown_frames(100, 16)) == 16
  with pytest.raises(ValueError, match="not a square grid"):
    overlay.overlay(frames, np.ones((2, 5), np.float32))
  with pytest.raises(ValueError, match=r"attention \[3, 4\] does not match 2 frames"):
    overlay.overlay(frames, np.ones((3, 4), np.float32))


def test_display_frames_are_the_models_crop_at_1_fps(tmp_path):
  from llamavid_jax.data.image import frames_to_uint8
  from llamavid_jax.data.video import load_video
  clip = video_fixtures.write_counter_clip(str(tmp_path / "c.mp4"), 40, 10, size=(64, 48))
  idx, shown, times = overlay.display_frames(image_size=28, video=clip, limit=3)
  frames, _ = load_video(clip, fps=1.0)
  assert idx.tolist() == [0, 2, 3] and shown.shape == (3, 224, 224, 3) and shown.dtype == np.uint8
  assert times == [0.0, 2.0, 3.0]
  np.testing.assert_array_equal(shown, frames_to_uint8(frames[idx], size=224))
  assert [video_fixtures.read_counter(f) for f in frames[idx]] == [0, 20, 30]
  # a model trained on every frame with a cap of 4 (the demo's sampling): those frames, their times
  idx, shown, times = overlay.display_frames(image_size=28, video=clip, fps=None, max_frames=4)
  frames, _ = load_video(clip, fps=None, max_frames=4)
  assert [video_fixtures.read_counter(f) for f in frames] == [0, 13, 26, 39] and idx.tolist() == [0, 1, 2, 3]
  np.testing.assert_array_equal(shown, frames_to_uint8(frames, size=224))
  np.testing.assert_allclose(times, [0.0, 1.3, 2.6, 3.9])


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "/no/such/dir"], "--ckpt /no/such/dir: no such directory"),
    (["--ckpt", ".", "--port", "0"], "--port must be in 1..65535, got 0"),
    (["--ckpt", ".", "--max-frames", "0"], "--max-frames must be >= 1, got 0"),
    (["--ckpt", ".", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--ckpt", ".", "--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
])
def test_flags_are_checked_before_the_model_loads(argv, message, capsys, monkeypatch):
  from eval import web
  from llamavid_jax import inference
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("loaded a model"))
  with pytest.raises(SystemExit) as e:
    web.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err
