"""`eval.serve` on the continuous-batching engine (`llamavid_jax/engine.py`), served on
127.0.0.1 (an ephemeral port) for the module: the real `openai` client gets
`inference.Model.generate`'s greedy answers, streaming and not; concurrent requests of
different prompts, media and budgets get exactly their one-at-a-time tokens, and a
request that arrives while others decode starts before they end (engine timestamps);
every bad request gets its 4xx with OpenAI's error body naming the field, and the
server goes on serving; a client that disconnects mid-stream frees its slot."""

import base64
import concurrent.futures
import io
import os
import threading
import time

import httpx
import jax
import numpy as np
import pytest

from eval import serve
from llamavid_jax import engine as engine_lib
from llamavid_jax import generate as gen
from llamavid_jax import inference
from llamavid_jax.data import synthetic
from llamavid_jax.data.image import preprocess_frames
from tests import data_fixtures
from tests.conftest import COMPILE_EVENTS

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MODEL = "tiny"
SLOTS, POSITIONS, MAX_FRAMES = 4, 128, 8
NEW = 16   # the references' budget: every request's budget is at most this
# Questions of the data fixtures' tokenizer: every prompt in one text bucket (64).
Q1, Q2, Q3 = "Hello What is this?", "Describe it.", "What is this?"


def _png(img) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def _data_url(img) -> str:
  return "data:image/png;base64," + base64.b64encode(_png(img)).decode()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """--media-root: a 2-frame (at 1 fps) clip, an image, a text file, a movie feature
  file (3 frames, subtitles), features one channel too wide; a file outside it and a
  symbolic link in it pointing there."""
  d = tmp_path_factory.mktemp("media_root")
  objects = synthetic.make_clip(np.random.default_rng(0), 28, 2, grid=2, n=2)
  synthetic.write_mp4(str(d / "clip.mp4"), [synthetic.draw(28, objects, k / 2) for k in range(4)], fps=2)
  data_fixtures.random_image(np.random.default_rng(1), 20, 12).save(d / "image.png")
  (d / "notes.mp4").write_text("not a video\n")
  from configs import tiny
  from llamavid_jax.data.features import Movie, write_safetensors
  vision = tiny.model_config().vision
  feats = np.random.default_rng(3).standard_normal((3, vision.num_tokens, vision.width)).astype(np.float16)
  write_safetensors(str(d / "movie.safetensors"), Movie(feats, "<image>Hello...<image><image>A dog runs."))
  np.save(d / "wide.npy", np.zeros((2, vision.num_tokens, vision.width + 1), np.float32))
  outside = tmp_path_factory.mktemp("outside") / "secret.mp4"
  outside.write_bytes((d / "clip.mp4").read_bytes())
  os.symlink(outside, d / "link.mp4")
  return str(d)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
  return inference.load(tiny_ckpt)


@pytest.fixture(scope="module")
def server(model, root):
  eng = engine_lib.Engine(model, slots=SLOTS, max_positions=POSITIONS, decode_chunk=4, max_queue=32)
  limits = serve.Limits(media_root=root, max_frames=MAX_FRAMES, max_tokens=64, max_body=1 << 20)
  running = serve.Running(serve.make_app(eng, MODEL, limits))
  running.engine = eng
  yield running
  running.stop()
  eng.close()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def frames():
  """Three images of different sizes: the frames of one clip as image_url parts."""
  rng = np.random.default_rng(2)
  return [data_fixtures.random_image(rng, w, h) for w, h in ((20, 12), (16, 16), (12, 24))]


def _cases(root, frames, model):
  """(messages, reference media, turns, budget) of requests that differ in prompt,
  media and budget."""
  video = {"type": "video_url", "video_url": {"url": f"file://{root}/clip.mp4"}}
  image = {"type": "image_url", "image_url": {"url": f"file://{root}/image.png"}}
  clip = [{"type": "image_url", "image_url": {"url": _data_url(f)}} for f in frames]
  text = lambda q: {"type": "text", "text": q}
  m_video = model.media(video=f"{root}/clip.mp4")
  m_image = model.media(image=f"{root}/image.png")
  m_clip = inference.Media("frames", preprocess_frames([np.asarray(f) for f in frames],
                                                       size=model.cfg.vision.image_size))
  user = lambda *parts: {"role": "user", "content": list(parts)}
  multi = [user(video, text(Q3)), {"role": "assistant", "content": "Hi."}, user(text(Q2))]
  return [   # text buckets 64 (Q1 with media, the multi-turn one) and 32; frame buckets 1, 2, 4
      ([user(video, text(Q1))], m_video, [Q1], 16),
      ([user(image, text(Q2))], m_image, [Q2], 5),
      ([user(*clip, text(Q3))], m_clip, [Q3], 9),
      ([{"role": "system", "content": "ignored"}, {"role": "user", "content": Q3}], None, [Q3], 3),
      (multi, m_video, [Q3, "Hi.", Q2], 12),
      ([user(image, text(Q3))], m_image, [Q3], 16),
      ([user(video, text(Q2))], m_video, [Q2], 1),
      ([user(*clip, text(Q2))], m_clip, [Q2], 7),
      ([user(text(Q3), video)], m_video, [Q3], 11),
      ([{"role": "user", "content": Q2}], None, [Q2], 14),
  ]


@pytest.fixture(scope="module")
def cases(root, frames, model):
  """The cases with their one-at-a-time greedy ids (`Model.generate`, one request a
  batch, NEW tokens cut to the budget: greedy decoding is causal)."""
  out = []
  for msgs, media, turns, budget in _cases(root, frames, model):
    [ans] = model.generate([model.request(turns, media)], max_new_tokens=NEW)
    out.append((msgs, ans.token_ids[:budget], budget))
  shapes = {(gen.bucket(len(r["input_ids"])), gen.bucket(len(r["frames"])))
            for r in (model.request(turns, media) for _, media, turns, _ in _cases(root, frames, model))}
  assert shapes == {(64, 2), (32, 1), (32, 2), (32, 4)}
  return out


def _ask(client, msgs, budget, **kw):
  r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=budget,
                                     extra_body={"return_token_ids": True}, **kw)
  return r.choices[0].model_extra["token_ids"], r


def _health(server):
  assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_the_openai_client_gets_generates_greedy_answer_streaming_and_not(client, server, model, cases):
  msgs, want, budget = cases[0]
  ids, r = _ask(client, msgs, budget)
  text = model.tokenizer.decode(want, skip_special_tokens=True).strip()
  assert ids == want and len(want) == budget
  assert r.choices[0].message.content == text and r.choices[0].finish_reason == "length"
  assert r.usage.completion_tokens == budget and r.usage.prompt_tokens > len(Q1.split())
  chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=budget,
                                               stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_seeded_sampling_is_generates(client, model, cases, root):
  """temperature / top_p / seed: a request draws as `Model.generate` does alone."""
  [ans] = model.generate([model.request(Q1, model.media(video=f"{root}/clip.mp4"))], max_new_tokens=NEW,
                         temperature=0.9, top_p=0.8, seed=5)
  r = client.chat.completions.create(model=MODEL, messages=cases[0][0], temperature=0.9, top_p=0.8, seed=5,
                                     max_tokens=NEW, extra_body={"return_token_ids": True})
  ids = r.choices[0].model_extra["token_ids"]
  assert ids == ans.token_ids


def test_stop_strings_cut_the_answer_as_generate_does_streaming_and_not(client, model, cases, root):
  msgs, want, budget = cases[0]
  full = model.tokenizer.decode(want, skip_special_tokens=True).strip()
  assert len(full.split()) >= 2
  stop = " " + full.split()[1]          # the answer's second word: the answer is its first
  [ans] = model.generate([model.request(Q1, model.media(video=f"{root}/clip.mp4"))], max_new_tokens=NEW, stop=(stop,))
  assert ans.text == full.split()[0] and len(ans.token_ids) < len(want)
  ids, r = _ask(client, msgs, budget, stop=stop)
  assert (ids, r.choices[0].message.content, r.choices[0].finish_reason) == (ans.token_ids, ans.text, "stop")
  chunks = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=budget, stop=[stop],
                                          stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == ans.text


def test_media_io_kwargs_num_frames_samples_a_clip_down(client, model, root, frames):
  """vLLM's media_io_kwargs.video.num_frames (lmms-eval's `openai` backend with
  pass_video_url) caps a clip's frames uniformly: clip.mp4's 2 frames at 1 fps -> the
  first; 3 image_url frames -> 2."""
  full = model.media(video=f"{root}/clip.mp4")
  assert full.num_frames == 2
  [ans] = model.generate([model.request(Q3, inference.Media("frames", full.array[:1]))], max_new_tokens=4)
  msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{root}/clip.mp4"}},
                                       {"type": "text", "text": Q3}]}]
  r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=4, extra_body={
      "return_token_ids": True, "media_io_kwargs": {"video": {"num_frames": 1}}})
  assert r.choices[0].model_extra["token_ids"] == ans.token_ids
  assert r.usage.prompt_tokens == _ask(client, msgs, 1)[1].usage.prompt_tokens - model.cfg.tokens_per_frame
  clip = [{"type": "image_url", "image_url": {"url": _data_url(f)}} for f in frames]
  msgs = [{"role": "user", "content": clip + [{"type": "text", "text": Q3}]}]
  capped = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=1,
                                          extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}})
  assert capped.usage.prompt_tokens == _ask(client, msgs, 1)[1].usage.prompt_tokens - model.cfg.tokens_per_frame


@pytest.mark.slow
def test_a_movie_feature_file_is_answered_with_the_movie_prompt(client, model, root):
  path = f"{root}/movie.safetensors"
  media = model.media(features=path)
  assert media.is_movie
  [ans] = model.generate([model.request(Q3, media)], max_new_tokens=NEW)
  msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{path}"}},
                                       {"type": "text", "text": Q3}]}]
  ids, r = _ask(client, msgs, NEW)
  assert ids == ans.token_ids and r.choices[0].message.content == ans.text
  assert r.usage.prompt_tokens > 3 * model.cfg.tokens_per_frame   # the subtitles and the frames' tokens


@pytest.mark.slow
def test_concurrent_requests_get_their_one_at_a_time_tokens_and_compile_once(client, server, cases):
  eng = server.engine

  def round_():
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
      return list(pool.map(lambda c: _ask(client, c[0], c[2])[0], cases))

  assert round_() == [want for _, want, _ in cases]
  assert eng.stats()["queue_depth"] == 0 and eng.slots_in_use == 0
  compiles, events = eng.compiles, []
  listener = lambda name, *a, **kw: events.append(name) if name in COMPILE_EVENTS else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    assert round_() == [want for _, want, _ in cases]   # more than SLOTS at once: some queue, then join
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert eng.compiles == compiles and not events
  clip = [k for k in eng.shapes if k[0] == "prefill" and k[2] == "clip"]
  assert len(clip) == 4 and ("decode", SLOTS, POSITIONS, 4, POSITIONS) in eng.shapes   # a prefill per (text, frame) bucket
  assert {k[1] for k in clip} == {1}   # one request a prefill (prefill_batch 1, the default)


@pytest.mark.slow
def test_a_request_arriving_mid_decode_starts_before_the_others_end(server, model, root, monkeypatch):
  """The late request is submitted by the engine's own thread right after a decode step
  in which all three others run, so it arrives while they decode."""
  eng, media = server.engine, model.media(video=f"{root}/clip.mp4")
  reqs = [model.request(q, media) for q in (Q1, Q2, Q3)]
  late_req = model.request(Q2, None)
  want = [a.token_ids for a in (model.generate([r], max_new_tokens=NEW)[0] for r in reqs)]
  late_want = model.generate([late_req], max_new_tokens=NEW)[0].token_ids[:2]
  assert all(len(w) == NEW for w in want)   # no eos: they run their whole budget
  hs, late, step = [], [], eng._step

  def step_then_arrive():
    step()
    if not late and len(hs) == 3 and all(h.started is not None for h in hs):
      late.append(eng.submit(late_req, engine_lib.Sampling(max_tokens=2)))

  monkeypatch.setattr(eng, "_step", step_then_arrive)
  with eng._cv:   # the engine's thread finds all three queued (a shape compiled in a submit no longer delays one)
    for r in reqs:
      hs.append(eng.submit(r, engine_lib.Sampling(max_tokens=NEW)))
  assert [h.result(120).token_ids for h in hs] == want
  assert late, "the three never ran together"
  [h] = late
  assert h.result(120).token_ids == late_want
  assert h.submitted > max(x.started for x in hs)      # it came while they decoded
  assert h.finished < min(x.finished for x in hs)      # and was done before any of them
  assert h.start_step > max(x.start_step for x in hs) and h.finish_step < min(x.finish_step for x in hs)


BAD = {   # name: (body, status, param, code)
    "unknown_model": (dict(model="gpt-4"), 404, "model", "model_not_found"),
    "negative_temperature": (dict(temperature=-0.5), 400, "temperature", "invalid_value"),
    "top_p_zero": (dict(top_p=0), 400, "top_p", "invalid_value"),
    "n_2": (dict(n=2), 400, "n", "invalid_value"),
    "max_tokens_over_limit": (dict(max_tokens=65), 400, "max_tokens", "invalid_value"),
    "bad_stop": (dict(stop=[1]), 400, "stop", "invalid_value"),
    "ends_with_assistant": (dict(messages=[{"role": "user", "content": "Hi."},
                                           {"role": "assistant", "content": "Hi."}]),
                            400, "messages", "invalid_value"),
    "unknown_part": (dict(messages=[{"role": "user", "content": [{"type": "audio_url"}]}]), 400,
                     "messages[0].content[0].type", "invalid_value"),
    "num_frames_zero": (dict(media_io_kwargs={"video": {"num_frames": 0}}), 400, "media_io_kwargs.video.num_frames",
                        "invalid_value"),
    "media_io_kwargs_a_list": (dict(media_io_kwargs=[8]), 400, "media_io_kwargs", "invalid_type"),
}


def _media_body(part: dict, n: int = 1) -> dict:
  return dict(messages=[{"role": "user", "content": [part] * n + [{"type": "text", "text": Q1}]}])


@pytest.fixture
def post(server):
  def post(body=None, content=None, **kw):
    if body is not None:
      body = {"model": MODEL, "messages": [{"role": "user", "content": Q1}], "max_tokens": 1, **body}
    return httpx.post(server.url + "/v1/chat/completions", json=body, content=content, timeout=120, **kw)
  return post


def _check_error(r, status, param, code):
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"]
  assert (err["param"], err["code"]) == (param, code)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_request_gets_a_4xx_naming_the_field_and_the_server_goes_on(name, post, server):
  body, status, param, code = BAD[name]
  _check_error(post(body), status, param, code)
  assert post({}).status_code == 200
  _health(server)


@pytest.mark.parametrize("name,part,n,code", [
    ("bad_data_url", {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}}, 1,
     "invalid_data_url"),
    ("data_url_not_an_image", {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                         + base64.b64encode(b"text").decode()}}, 1,
     "invalid_image"),
    ("outside_media_root", {"type": "video_url", "video_url": {"url": "file:///etc/hostname"}}, 1,
     "media_outside_root"),
    ("link_out_of_media_root", {"type": "video_url", "video_url": {"url": "file://ROOT/link.mp4"}}, 1,
     "media_outside_root"),
    ("dot_dot_out_of_media_root", {"type": "video_url", "video_url": {"url": "file://ROOT/../outside/x.mp4"}}, 1,
     "media_outside_root"),
    ("missing_file", {"type": "video_url", "video_url": {"url": "file://ROOT/none.mp4"}}, 1, "file_not_found"),
    ("not_a_video", {"type": "video_url", "video_url": {"url": "file://ROOT/notes.mp4"}}, 1, "invalid_video"),
    ("features_of_another_model", {"type": "video_url", "video_url": {"url": "file://ROOT/wide.npy"}}, 1,
     "invalid_video"),
    ("image_as_video", {"type": "video_url", "video_url": {"url": "file://ROOT/image.png"}}, 1, "invalid_video"),
    ("network_url", {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, 1, "invalid_url"),
    ("too_many_frames", {"type": "image_url", "image_url": {"url": "file://ROOT/image.png"}}, MAX_FRAMES + 1,
     "too_many_frames"),
])
def test_bad_media_gets_a_400_naming_the_part(name, part, n, code, post, server, root):
  part = {k: ({"url": v["url"].replace("ROOT", root)} if isinstance(v, dict) else v) for k, v in part.items()}
  r = post(_media_body(part, n))
  _check_error(r, 400, f"messages[0].content[{n - 1}].{part['type']}", code)
  assert post({}).status_code == 200
  _health(server)


def test_malformed_json_a_large_body_a_full_queue_and_a_long_prompt(post, server, root):
  _check_error(post(content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}),
               400, None, "invalid_json")
  _check_error(post(content=b"[]"), 400, None, "invalid_json")
  _check_error(post(content=b" " * (1 << 20) + b"{}"), 413, None, "body_too_large")
  eng = server.engine
  eng.max_queue = 0
  try:
    r = post({})
  finally:
    eng.max_queue = 32
  _check_error(r, 429, None, "queue_full")
  assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
  # a prompt that leaves no room for its budget (the slot holds POSITIONS)
  video = {"type": "video_url", "video_url": {"url": f"file://{root}/clip.mp4"}}
  long = {"max_tokens": 64, "messages": [{"role": "user", "content": [video, {"type": "text", "text": Q1}]}]}
  _check_error(post(long), 400, "max_tokens", "context_length_exceeded")
  assert post({}).status_code == 200
  _health(server)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, root, monkeypatch):
  """The engine waits after the step that sent the first piece until the server has
  cancelled the request (the client gone): its slot frees at the next step, long before
  its budget ends."""
  eng = server.engine
  before, take = dict(eng.finished), eng._take

  def take_then_wait(h, toks):
    reason = take(h, toks)
    deadline = time.monotonic() + 60
    while h.shown and not h.cancelled and time.monotonic() < deadline:
      time.sleep(0.01)
    return reason

  monkeypatch.setattr(eng, "_take", take_then_wait)
  body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": 60,
          "messages": [{"role": "user", "content": [
              {"type": "video_url", "video_url": {"url": f"file://{root}/clip.mp4"}}, {"type": "text", "text": Q1}]}]}
  with httpx.Client(timeout=120) as c:
    with c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")          # the role chunk
      while not (line := next(lines)).startswith("data: "):
        pass
      assert '"content": "' in line and '"finish_reason": null' in line
  _assert_cancelled_and_freed(server, before)


def _assert_cancelled_and_freed(server, before: dict) -> None:
  """The one request since `before` (engine.finished counts) was cancelled, not run to
  its budget, its slot is free again (within 60 s) and the server still serves."""
  eng = server.engine
  deadline = time.monotonic() + 60
  while eng.slots_in_use:
    assert time.monotonic() < deadline, "the slot was not freed"
    time.sleep(0.05)
  assert eng.finished["cancelled"] == before.get("cancelled", 0) + 1
  assert eng.finished["length"] == before.get("length", 0)
  _health(server)


def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_frees_its_slot(server, root, monkeypatch):
  """Not streamed: the client closes its socket while its request decodes (the engine
  held after the request's first piece, as above)."""
  import json
  import socket
  eng = server.engine
  before, take, running = dict(eng.finished), eng._take, threading.Event()

  def take_then_wait(h, toks):
    reason = take(h, toks)
    deadline = time.monotonic() + 60
    while h.shown and not h.cancelled and time.monotonic() < deadline:
      running.set()
      time.sleep(0.01)
    return reason

  monkeypatch.setattr(eng, "_take", take_then_wait)
  body = json.dumps({"model": MODEL, "temperature": 0, "max_tokens": 60, "messages": [{"role": "user", "content": [
      {"type": "video_url", "video_url": {"url": f"file://{root}/clip.mp4"}}, {"type": "text", "text": Q1}]}]}).encode()
  with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert running.wait(60), "the request never decoded"
  _assert_cancelled_and_freed(server, before)


def test_models_health_and_metrics(server, post):
  models = httpx.get(server.url + "/v1/models").json()
  assert [d["id"] for d in models["data"]] == [MODEL]
  assert httpx.get(server.url + "/health").json() == {"status": "ok", "slots": SLOTS, "slots_in_use": 0,
                                                      "queue_depth": 0}
  assert post({"max_tokens": 3, "temperature": 0}).json()["usage"]["completion_tokens"] == 3
  text = httpx.get(server.url + "/metrics").text
  values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
  eng = server.engine
  assert values["llamavid_slots"] == SLOTS and values["llamavid_slots_in_use"] == 0
  assert values["llamavid_queue_depth"] == 0
  assert values["llamavid_generated_tokens_total"] == eng.generated_tokens >= 3
  assert values["llamavid_time_to_first_token_seconds_count"] == eng.ttft_count >= 1
  assert 'llamavid_time_to_first_token_seconds{quantile="0.99"}' in values
  assert values["llamavid_compiles_total"] == eng.compiles
  assert 0 < values["llamavid_slot_utilisation"] <= 1


def test_arguments_are_checked_before_the_model_loads(tmp_path, capsys):
  with pytest.raises(SystemExit):
    serve.main(["--ckpt", str(tmp_path / "none")])
  assert "no such directory" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    serve.main(["--ckpt", str(tmp_path), "--slots", "0"])
  assert "--slots must be >= 1" in capsys.readouterr().err
  with serve.listen("127.0.0.1", 0) as taken:   # a port in use: one line, no model loaded
    port = taken.getsockname()[1]
    taken.listen()
    with pytest.raises(SystemExit, match=f"error: --host 127.0.0.1 --port {port}: Address already in use"):
      serve.main(["--ckpt", str(tmp_path), "--port", str(port)])


def test_main_serves_the_checkpoint_under_its_name(tiny_ckpt, root, monkeypatch):
  """`python -m eval.serve`'s wiring: the model loads, the engine starts, the app goes to
  uvicorn on a socket bound to the flags' host and port (`serve.run_server` replaced: the
  app is asked in-process)."""
  from fastapi.testclient import TestClient
  seen = {}

  def run(app, sock):
    seen["host"], seen["port"] = sock.getsockname()
    with TestClient(app) as c:
      seen["models"] = c.get("/v1/models").json()
      seen["outside"] = c.post("/v1/chat/completions", json={"model": "toy", "messages": [{"role": "user", "content": [
          {"type": "video_url", "video_url": {"url": "file:///etc/hostname"}}]}]}).json()["error"]["code"]

  monkeypatch.setattr(serve, "run_server", run)
  serve.main(["--ckpt", tiny_ckpt, "--served-model-name", "toy", "--port", "0", "--slots", "2",
              "--max-positions", "64", "--media-root", root])
  assert seen["host"] == "127.0.0.1" and seen["port"] > 0   # port 0: an ephemeral one
  assert [d["id"] for d in seen["models"]["data"]] == ["toy"] and seen["outside"] == "media_outside_root"


def _served_answer(argv, monkeypatch, content=Q1, budget=NEW) -> tuple[list[int], engine_lib.Engine]:
  """`eval.serve.main(argv)`'s greedy token ids for one question, asked in-process
  (`serve.run_server` replaced by a TestClient of the app), and the engine that answered."""
  from fastapi.testclient import TestClient
  seen, engines = {}, []

  class Recorded(engine_lib.Engine):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      engines.append(self)

  monkeypatch.setattr(engine_lib, "Engine", Recorded)

  def run(app, sock):
    with TestClient(app) as c:
      r = c.post("/v1/chat/completions", json={"model": "toy", "messages": [{"role": "user", "content": content}],
                                               "temperature": 0, "max_tokens": budget, "return_token_ids": True})
      seen["ids"] = r.json()["choices"][0]["token_ids"]

  monkeypatch.setattr(serve, "run_server", run)
  serve.main(argv + ["--served-model-name", "toy", "--slots", "2", "--max-positions", "64", "--port", "0"])
  [eng] = engines
  return seen["ids"], eng


@pytest.mark.slow
def test_main_with_quant_int8_answers_with_the_quantized_models_tokens(tiny_ckpt, monkeypatch):
  """--quant int8 (and a chunked prefill: the quantized `prefill_step`): the tokens of
  `inference.load(..., quant="int8")` + generate. (A quantized model split over meshes:
  tests/test_inference_mesh.py; --mesh here: the next test.)"""
  q = inference.load(tiny_ckpt, quant="int8")
  [want] = q.generate([q.request(Q1, None)], max_new_tokens=NEW)
  ids, eng = _served_answer(["--ckpt", tiny_ckpt, "--quant", "int8", "--prefill-chunk", "16"], monkeypatch)
  assert ids == want.token_ids and len(ids) == NEW
  kernel = eng.m.params["llm"]["layers"]["q_proj"]["kernel"].array
  assert eng.m.quant == "int8" and kernel.qvalue.dtype == jax.numpy.int8   # the server's model is quantized
  assert {k[0] for k in eng.shapes} == {"decode", "stage", "fill", "install"}   # prefilled in chunks


@pytest.mark.slow
def test_main_on_a_mesh_answers_as_one_device(tiny_ckpt, model, monkeypatch):
  """--mesh data=-1,tensor=2 (8 fake CPU devices: heads and MLP columns over 2): the
  greedy answer of one device."""
  [want] = model.generate([model.request(Q1, None)], max_new_tokens=NEW)
  ids, eng = _served_answer(["--ckpt", tiny_ckpt + "/inference", "--mesh", "data=-1,tensor=2"], monkeypatch)
  assert ids == want.token_ids and len(ids) == NEW
  kernel = eng.m.params["llm"]["layers"]["gate_proj"]["kernel"]   # [layers, embed, mlp]: mlp over tensor
  assert kernel.sharding.spec[2] == "tensor" and kernel.addressable_shards[0].data.shape[2] == kernel.shape[2] // 2
