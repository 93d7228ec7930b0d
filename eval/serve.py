"""An OpenAI-compatible server of a checkpoint, on the continuous-batching engine.

  python -m eval.serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--slots 16]
      [--media-root DIR] [--max-queue 64] [--max-positions 2048] [--max-frames 256]
      [--max-tokens 1024] [--max-body-mb 64] [--dtype float32|bfloat16] [--decode-chunk 4]
      [--prefill-chunk C] [--prefill-batch 1] [--mesh AXIS=N,...] [--quant int8|int4] [--served-model-name NAME]

Endpoints:
- `POST /v1/chat/completions`: `messages` whose `content` is a string or a list of parts:
  `text`; `image_url` ({"url": "data:image/...;base64,..."} or "file:///..." under
  `--media-root`): one image, or several in one message, which are the frames of one
  clip in order (lmms-eval's `openai` backend sends a video so); `video_url` (a file://
  video or a `.safetensors` / `.npy` feature file under `--media-root`, or a
  data:video/... URL), as vLLM accepts. A movie feature file (with `inputs`) is answered
  with the release's movie prompt. Fields: `model`, `stream` (server-sent events in
  OpenAI's chunk format, ending with `data: [DONE]`; `stream_options.include_usage`),
  `temperature` (0: greedy; default the release's chat 0.2, or 0.6 for a movie),
  `top_p` (default 0.7, or 0.9), `max_tokens` / `max_completion_tokens`, `stop` (a
  string or up to 4), `seed`, `n` (1 only), and vLLM's `return_token_ids` (the answer's
  generated ids in the choice) and `media_io_kwargs: {"video": {"num_frames": N}}` (a
  clip's frames, a video's at 1 fps or several image_url parts, sampled uniformly down to
  N, as lmms_adapter's max_frames; lmms-eval's `openai` backend sends it with every
  request when `pass_video_url=True`). Other fields are ignored. `usage` counts the prompt's LLM positions (text and
  visual tokens) and the generated tokens.
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text: queue depth, slots in
  use, generated tokens and tokens/s, time to first token, compiles, finished requests).

Conversations follow the release's chat (`eval.chat`, `llamavid_jax/inference.py`): the
user / assistant turns in order, the media in the latest user turn whatever turn carried
it (the latest turn that has media gives the clip), the latest question as the Q-Former
instruction; `system` messages are ignored (the release's template has its own).

Limits: at most `--max-queue` requests wait for a slot (then 429 with Retry-After);
bodies over `--max-body-mb` get 413; more than `--max-frames` frames, a prompt plus
`max_tokens` over `--max-positions` cache positions, or `max_tokens` over `--max-tokens`
get 400. Every bad request gets a 4xx with OpenAI's error body, {"error": {"message",
"type", "param", "code"}}, `param` naming the field (`messages[0].content[1].image_url`).
No file outside `--media-root` is read (symbolic links resolved first), and no URL is
fetched from the network. A client that disconnects has its request cancelled and its
slot freed. It listens on localhost unless `--host` says otherwise; needs
`pip install 'llamavid-jax[serve]'`.
"""


import argparse  # no `from __future__ import annotations`: FastAPI reads the handlers' annotations
import asyncio
import base64
import binascii
import collections
import dataclasses
import io
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from typing import Any

from eval import args as eval_args
from llamavid_jax import cli
from llamavid_jax import engine as engine_lib
from llamavid_jax import inference

VIDEO_MIME = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
              "video/x-msvideo": ".avi", "video/avi": ".avi", "image/gif": ".gif", "video/x-m4v": ".m4v"}
FEATURE_SUFFIXES = (".safetensors", ".npy")
MAX_STOPS = 4


class ApiError(Exception):
  """A request the server refuses: HTTP `status` and OpenAI's error fields."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
  media_root: str | None = None
  max_frames: int = 256
  max_tokens: int = 1024
  max_body: int = 64 << 20
  retry_after: int = 1   # seconds, in a 429's Retry-After


@dataclasses.dataclass
class Chat:
  """A parsed request: the user / assistant turns, the media parts of the clip, sampling."""

  turns: list[str]
  media: list[tuple[str, str, str]]     # (part type, url, param) of the clip's parts
  stream: bool = False
  include_usage: bool = False
  return_token_ids: bool = False
  temperature: float | None = None
  top_p: float | None = None
  max_tokens: int | None = None
  stop: tuple[str, ...] = ()
  seed: int | None = None
  num_frames: int | None = None         # vLLM's media_io_kwargs.video.num_frames: a video's frame cap


# --- parsing ----------------------------------------------------------------------------
def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
  v = body.get(name)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ApiError(400, f"{name} must be a number, got {v!r}", name, "invalid_type")
  if v < lo or v > hi or (lo_open and v == lo):
    raise ApiError(400, f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}", name, "invalid_value")
  return float(v)


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
  v = body.get(name)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, int):
    raise ApiError(400, f"{name} must be an integer, got {v!r}", name, "invalid_type")
  if not lo <= v <= hi:
    raise ApiError(400, f"{name} must be in [{lo}, {hi}], got {v}", name, "invalid_value")
  return v


def _url(part: dict, kind: str, param: str) -> str:
  v = part.get(kind)
  url = v.get("url") if isinstance(v, dict) else v
  if not isinstance(url, str) or not url:
    raise ApiError(400, f"{param} must be {{\"url\": \"...\"}} with a data: or file:// URL", param, "invalid_value")
  return url


def parse_chat(body: Any, model_name: str, limits: Limits) -> Chat:
  """A request body (parsed JSON) -> Chat; raises ApiError naming the field."""
  if not isinstance(body, dict):
    raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
  model = body.get("model")
  if not isinstance(model, str):
    raise ApiError(400, "model is required: a string", "model", "invalid_value")
  if model != model_name:
    raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                   "model_not_found")
  n = body.get("n", 1)
  if n is not None and (isinstance(n, bool) or n != 1):
    raise ApiError(400, f"n must be 1 (one choice per request), got {n!r}", "n", "invalid_value")
  if body.get("logprobs") or body.get("tools"):
    name = "logprobs" if body.get("logprobs") else "tools"
    raise ApiError(400, f"{name} is not supported", name, "unsupported")
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise ApiError(400, "messages must be a non-empty list", "messages", "invalid_value")
  turns: list[tuple[str, str]] = []
  clip: list[tuple[str, str, str]] = []
  for i, msg in enumerate(msgs):
    at = f"messages[{i}]"
    if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
      raise ApiError(400, f"{at} must be an object with role system, user or assistant", f"{at}.role", "invalid_value")
    role, content = msg["role"], msg.get("content")
    texts, media = [], []
    if isinstance(content, str):
      texts.append(content)
    elif isinstance(content, list):
      for j, part in enumerate(content):
        pat = f"{at}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
          if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{pat}.text must be a string", f"{pat}.text", "invalid_value")
          texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
          media.append((kind, _url(part, kind, f"{pat}.{kind}"), f"{pat}.{kind}"))
        else:
          raise ApiError(400, f"{pat}.type must be text, image_url or video_url, got {kind!r}", f"{pat}.type",
                         "invalid_value")
    elif content is not None or role == "user":
      raise ApiError(400, f"{at}.content must be a string or a list of parts", f"{at}.content", "invalid_value")
    if role == "system":
      continue
    if media and role != "user":
      raise ApiError(400, f"{at}: media goes in user messages", f"{at}.content", "invalid_value")
    if media:
      clip = media
    turns.append((role, "\n".join(texts)))
  roles = [r for r, _ in turns]
  if not roles or roles != ["user" if k % 2 == 0 else "assistant" for k in range(len(roles))] or roles[-1] != "user":
    raise ApiError(400, "messages must alternate user and assistant turns, starting and ending with a user turn "
                   f"(system messages aside), got {roles}", "messages", "invalid_value")
  kinds = {k for k, _, _ in clip}
  if len(kinds) > 1 or ("video_url" in kinds and len(clip) > 1):
    raise ApiError(400, "one clip per request: one video_url, or image_url parts (the frames of one clip)",
                   clip[-1][2], "invalid_value")
  if len(clip) > limits.max_frames:
    raise ApiError(400, f"{len(clip)} image_url frames, more than the server's --max-frames {limits.max_frames}",
                   clip[-1][2], "too_many_frames")
  stop = body.get("stop")
  if isinstance(stop, str):
    stop = [stop]
  if stop is None:
    stop = []
  if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
    raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop", "invalid_value")
  stream = body.get("stream", False)
  if not isinstance(stream, bool) and stream is not None:
    raise ApiError(400, "stream must be a boolean", "stream", "invalid_type")
  opts = body.get("stream_options") or {}
  if not isinstance(opts, dict):
    raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_type")
  max_tokens = _int(body, "max_completion_tokens", 1, limits.max_tokens)
  max_tokens = _int(body, "max_tokens", 1, limits.max_tokens) if max_tokens is None else max_tokens
  num_frames = _num_frames(body.get("media_io_kwargs"))
  return Chat([t for _, t in turns], clip, stream=bool(stream), include_usage=bool(opts.get("include_usage")),
              return_token_ids=bool(body.get("return_token_ids")),
              temperature=_number(body, "temperature", 0.0, 2.0), top_p=_number(body, "top_p", 0.0, 1.0, lo_open=True),
              max_tokens=max_tokens, stop=tuple(s for s in stop if s), seed=_int(body, "seed", 0, 2 ** 31 - 1),
              num_frames=num_frames)


def _num_frames(mio: Any) -> int | None:
  """vLLM's `media_io_kwargs: {"video": {"num_frames": N}}` (lmms-eval's `openai` backend
  sends it with pass_video_url) -> N, or None (absent, or -1: every frame)."""
  param = "media_io_kwargs.video.num_frames"
  if mio is None:
    return None
  video = mio.get("video") if isinstance(mio, dict) else None
  if not isinstance(mio, dict) or not isinstance(video, (dict, type(None))):
    raise ApiError(400, 'media_io_kwargs must be an object such as {"video": {"num_frames": 8}}', "media_io_kwargs",
                   "invalid_type")
  n = (video or {}).get("num_frames")
  if n is None or n == -1:
    return None
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ApiError(400, f"{param} must be a positive integer (or -1: every frame), got {n!r}", param, "invalid_value")
  return n


# --- media -------------------------------------------------------------------------------
def _data_url(url: str, param: str) -> tuple[str, bytes]:
  """data:MIME;base64,PAYLOAD -> (mime, bytes)."""
  head, sep, payload = url.partition(",")
  if not sep or not head.startswith("data:") or not head.endswith(";base64"):
    raise ApiError(400, f"{param}: a data URL must read data:<mime>;base64,<payload>", param, "invalid_data_url")
  try:
    return head[5:-7].lower(), base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError) as e:
    raise ApiError(400, f"{param}: the data URL's payload is not base64 ({e})", param, "invalid_data_url") from None


def _file_url(url: str, param: str, root: str | None) -> str:
  """file:///path under `root` -> the real path; anything else is refused."""
  u = urllib.parse.urlparse(url)
  if u.scheme != "file":
    raise ApiError(400, f"{param}: only data: and file:// URLs are served (no network fetches), got "
                   f"{u.scheme or 'no'} scheme", param, "invalid_url")
  if root is None:
    raise ApiError(400, f"{param}: file:// URLs need the server's --media-root", param, "media_outside_root")
  if u.netloc not in ("", "localhost"):
    raise ApiError(400, f"{param}: a file:// URL names no host, got {u.netloc!r}", param, "invalid_url")
  path = os.path.realpath(urllib.parse.unquote(u.path))
  real_root = os.path.realpath(root)
  if os.path.commonpath([path, real_root]) != real_root:
    raise ApiError(400, f"{param}: {u.path} is outside the server's --media-root", param, "media_outside_root")
  if not os.path.isfile(path):
    raise ApiError(400, f"{param}: {u.path}: no such file under --media-root", param, "file_not_found")
  return path


def _image(url: str, param: str, root: str | None):
  from PIL import Image
  try:
    if url.startswith("data:"):
      mime, data = _data_url(url, param)
      img = Image.open(io.BytesIO(data))
    else:
      img = Image.open(_file_url(url, param, root))
    img.load()
    from llamavid_jax.data.image import to_rgb
    return to_rgb(img)   # a 16-bit image scaled to 8 bits, not clipped
  except ApiError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ApiError(400, f"{param}: not an image ({type(e).__name__}: {e})", param, "invalid_image") from None


def load_media(m: inference.Model, chat: Chat, limits: Limits) -> inference.Media | None:
  """The request's clip -> Media (None without media), a clip's frames (a video's at 1 fps,
  or several image_url parts) sampled uniformly down to media_io_kwargs' num_frames, as
  lmms_adapter's max_frames does; raises ApiError naming the part."""
  if not chat.media:
    return None
  media = _load_media(m, chat, limits)
  if media.kind == "frames" and chat.num_frames and media.num_frames > chat.num_frames:
    from llamavid_jax.data.frames import uniform_cap
    media = dataclasses.replace(media, array=media.array[uniform_cap(media.num_frames, chat.num_frames)])
  if media.num_frames > limits.max_frames:
    param = chat.media[-1][2]
    raise ApiError(400, f"{param}: {media.num_frames} frames at {m.sampling}, more than the server's --max-frames "
                   f"{limits.max_frames}", param, "too_many_frames")
  return media


def _load_media(m: inference.Model, chat: Chat, limits: Limits) -> inference.Media:
  kind, url, param = chat.media[0]
  if kind == "image_url":
    imgs = [_image(u, p, limits.media_root) for _, u, p in chat.media]
    if len(imgs) == 1:
      return m.image_media(imgs[0], param)
    return m.frames_media(imgs, f"{len(imgs)} image_url frames")
  tmp = None
  try:
    if url.startswith("data:"):
      mime, data = _data_url(url, param)
      if mime not in VIDEO_MIME:
        raise ApiError(400, f"{param}: {mime or 'no MIME type'} is not a video type ({', '.join(VIDEO_MIME)})",
                       param, "invalid_video")
      with tempfile.NamedTemporaryFile(suffix=VIDEO_MIME[mime], delete=False) as f:
        f.write(data)
      path = tmp = f.name
    else:
      path = _file_url(url, param, limits.media_root)
    if inference.media_kind(path) == "image":
      raise ApiError(400, f"{param}: an image, not a video (send it as image_url)", param, "invalid_video")
    try:
      media = m.media(**{"features" if path.lower().endswith(FEATURE_SUFFIXES) else "video": path})
    except (inference.MediaError, ValueError, OSError, KeyError) as e:
      why = e.why if isinstance(e, inference.MediaError) else f"{type(e).__name__}: {e}"
      raise ApiError(400, f"{param}: not a usable video or feature file ({why})", param, "invalid_video") from None
  finally:
    if tmp is not None:
      os.unlink(tmp)
  if media.kind == "features":   # the model checks it too, but only once the request has its slot
    want = dataclasses.replace(m.cfg, video_mode="movie" if media.is_movie else "clip").feature_shape
    if tuple(media.array.shape[1:]) != tuple(want):
      raise ApiError(400, f"{param}: features of shape {list(media.array.shape)}; this model takes "
                     f"[T, {want[0]}, {want[1]}]", param, "invalid_video")
  return media


# --- the app ------------------------------------------------------------------------------
def _chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None, **extra) -> str:
  choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
  return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]})


def _sse(obj: dict) -> str:
  return f"data: {json.dumps(obj)}\n\n"


def _usage(c: engine_lib.Completion) -> dict:
  return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
          "total_tokens": c.prompt_tokens + c.completion_tokens}


def metrics_text(stats: dict, responses: collections.Counter) -> str:
  """Prometheus text exposition of the engine's figures and the HTTP status counts."""
  out = []

  def metric(name, kind, help_, samples):
    out.extend([f"# HELP llamavid_{name} {help_}", f"# TYPE llamavid_{name} {kind}"])
    for labels, v in samples:
      out.append(f"llamavid_{name}{labels} {v:.9g}" if isinstance(v, float) else f"llamavid_{name}{labels} {v}")

  steps = stats["decode_steps"]
  metric("queue_depth", "gauge", "Requests waiting for a decode slot.", [("", stats["queue_depth"])])
  metric("slots", "gauge", "Decode slots.", [("", stats["slots"])])
  metric("slots_in_use", "gauge", "Decode slots running a request.", [("", stats["slots_in_use"])])
  metric("generated_tokens_total", "counter", "Tokens generated.", [("", stats["generated_tokens"])])
  metric("generated_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
         [("", float(stats["tokens_per_second"]))])
  metric("decode_steps_total", "counter", "Decode steps run (every slot each).", [("", steps)])
  metric("slot_utilisation", "gauge", "Slots in use per decode step over all steps, as a fraction of the slots.",
         [("", float(stats["busy_row_steps"] / (steps * stats["slots"])) if steps else 0.0)])
  metric("compiles_total", "counter", "Distinct shapes compiled (decode step and prefill buckets).",
         [("", stats["compiles"])])
  metric("requests_finished_total", "counter", "Requests ended, by finish reason.",
         [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(stats["finished"].items())])
  metric("http_responses_total", "counter", "Chat completion responses, by HTTP status.",
         [(f'{{code="{k}"}}', v) for k, v in sorted(responses.items())])
  metric("time_to_first_token_seconds", "summary", "From submission to the first generated token.",
         [(f'{{quantile="{q}"}}', float(v)) for q, v in stats["ttft_quantiles"].items()]
         + [("_sum", float(stats["ttft_sum"])), ("_count", stats["ttft_count"])])
  return "\n".join(out) + "\n"


def make_app(engine: engine_lib.Engine, model_name: str, limits: Limits):
  """The FastAPI app over a running engine."""
  from fastapi import FastAPI, Request
  from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
  from starlette.concurrency import run_in_threadpool
  from starlette.exceptions import HTTPException as StarletteHTTPException

  app = FastAPI(title="llamavid-jax", docs_url=None, redoc_url=None, openapi_url=None)
  m = engine.m
  created = int(time.time())
  responses: collections.Counter = collections.Counter()

  def error(e: ApiError) -> JSONResponse:
    responses[e.status] += 1
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, exc):   # unknown routes and methods: OpenAI's body too
    return error(ApiError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None))

  @app.get("/health")
  async def health():
    ok = engine.alive
    return JSONResponse({"status": "ok" if ok else "engine stopped", "slots": engine.slots,
                         "slots_in_use": engine.slots_in_use, "queue_depth": engine.queue_depth},
                        status_code=200 if ok else 503)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "llamavid-jax", "max_model_len": engine.max_positions}]}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(metrics_text(engine.stats(), responses), media_type="text/plain; version=0.0.4")

  async def read_body(request: Request) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limits.max_body:
      raise ApiError(413, f"the body is {size} bytes, more than the server's limit of {limits.max_body}", None,
                     "body_too_large")
    chunks, n = [], 0
    async for c in request.stream():
      n += len(c)
      if n > limits.max_body:
        raise ApiError(413, f"the body is over the server's limit of {limits.max_body} bytes", None, "body_too_large")
      chunks.append(c)
    return b"".join(chunks)

  def prepare(chat: Chat, on_event) -> engine_lib.Handle:
    """Media, prompt and submission (in a worker thread: video decoding and padding)."""
    media = load_media(m, chat, limits)
    default = inference.MOVIE if media is not None and media.is_movie else inference.CHAT
    with engine.tokenizer_lock:
      req = m.request(chat.turns, media)
    max_tokens = chat.max_tokens
    if max_tokens is None:   # as many as fit the slot, up to --max-tokens
      max_tokens = max(1, min(limits.max_tokens, engine.max_positions - engine.positions(req)))
    sampling = engine_lib.Sampling(
        max_tokens=max_tokens, stop=chat.stop,
        temperature=default["temperature"] if chat.temperature is None else chat.temperature,
        top_p=default["top_p"] if chat.top_p is None else chat.top_p,
        seed=int.from_bytes(os.urandom(4), "little") >> 1 if chat.seed is None else chat.seed)
    try:
      return engine.submit(req, sampling, on_event)
    except engine_lib.QueueFull as e:
      raise ApiError(429, f"the server is busy: {e}", None, "queue_full", "rate_limit_error",
                     {"Retry-After": str(limits.retry_after)}) from None
    except engine_lib.RequestTooLarge as e:
      raise ApiError(400, str(e), e.field, "context_length_exceeded") from None
    except engine_lib.EngineStopped as e:
      raise ApiError(503, str(e), None, "engine_stopped", "server_error") from None

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    try:
      raw = await read_body(request)
      try:
        body = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None
      chat = parse_chat(body, model_name, limits)
      loop = asyncio.get_running_loop()
      events: asyncio.Queue = asyncio.Queue()
      on_event = lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
      handle = await run_in_threadpool(prepare, chat, on_event)
    except ApiError as e:
      return error(e)
    except Exception as e:   # a bug: the request fails, the server goes on
      return error(ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error", "server_error"))
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    responses[200] += 1
    if chat.stream:
      return StreamingResponse(_stream(handle, events, rid, now, chat), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(request, handle, events, rid, now, chat)

  async def _stream(handle, events, rid, now, chat):
    """The request's SSE events. Those ready together go out in one write (a decode
    dispatch yields several tokens, and a short answer ends with them): one send each
    would cost the server's one event loop a write per event."""
    out = [_chunk(rid, now, model_name, {"role": "assistant", "content": ""})]
    try:
      while True:
        if events.empty():
          yield "".join(out)
          out = []
        kind, payload = await events.get()
        if kind == "delta":
          out.append(_chunk(rid, now, model_name, {"content": payload}))
          continue
        if kind == "done":
          extra = {"token_ids": payload.token_ids} if chat.return_token_ids else {}
          out.append(_chunk(rid, now, model_name, {}, payload.finish_reason, **extra))
          if chat.include_usage:
            out.append(_sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                             "choices": [], "usage": _usage(payload)}))
        else:
          out.append(_sse(ApiError(500, f"generation failed: {payload}", None, "internal_error",
                                   "server_error").body()))
        out.append("data: [DONE]\n\n")
        yield "".join(out)
        return
    finally:   # the client went away (or the stream ended): the slot is freed at the next step
      handle.cancel()

  async def _complete(request, handle, events, rid, now, chat):
    async def disconnected():
      while (await request.receive())["type"] != "http.disconnect":
        pass

    watch = asyncio.ensure_future(disconnected())
    try:
      while True:
        get = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
          get.cancel()
          handle.cancel()
          return JSONResponse({}, status_code=499)   # nobody reads it
        kind, payload = get.result()
        if kind == "delta":
          continue
        if kind == "error":
          return error(ApiError(500, f"generation failed: {payload}", None, "internal_error", "server_error"))
        choice = {"index": 0, "message": {"role": "assistant", "content": payload.text}, "logprobs": None,
                  "finish_reason": payload.finish_reason}
        if chat.return_token_ids:
          choice["token_ids"] = payload.token_ids
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                             "choices": [choice], "usage": _usage(payload)})
    finally:
      watch.cancel()
      handle.cancel()

  return app


# --- running ------------------------------------------------------------------------------
class Running:
  """A uvicorn server on its own thread (tests, the benchmark): `url`, `stop()`."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    import uvicorn
    self.sock = listen(host, port)
    self.port = self.sock.getsockname()[1]
    self.url = f"http://{host}:{self.port}"
    self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      if not self.thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the server on {self.url} did not start")
      time.sleep(0.05)

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(30)
    self.sock.close()


def parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  eval_args.add_model_flags(p)   # --ckpt --dtype --mesh --quant
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
  p.add_argument("--port", type=int, default=8000, help="0: an ephemeral port (the serving line names it)")
  p.add_argument("--slots", type=int, default=16, help="requests decoded at once")
  p.add_argument("--media-root", help="file:// URLs are served from under this directory only (default: none)")
  p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429")
  p.add_argument("--max-positions", type=int, default=2048,
                 help="KV cache positions per slot: prompt (text and visual tokens, bucketed) plus answer")
  p.add_argument("--max-frames", type=int, default=256, help="frames per request (at 1 fps for a video)")
  p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask")
  p.add_argument("--max-body-mb", type=float, default=64.0, help="request bodies over this get 413")
  p.add_argument("--decode-chunk", type=int, default=4, help="decode steps per dispatch (requests join between)")
  p.add_argument("--prefill-chunk", type=int, default=0,
                 help="prefill a prompt C positions per dispatch, the running requests decoding between "
                      "(0: each prompt in one dispatch)")
  p.add_argument("--prefill-batch", type=int, default=1,
                 help="queued requests of one prompt shape (buckets) prefilled together in one dispatch, at most "
                      "(unchunked prefill only; a group size of a shape compiles when that many of its requests first "
                      "wait at once)")
  p.add_argument("--served-model-name", help="the model id clients name (default: the --ckpt directory's name)")
  return p


def main(argv=None) -> None:
  p = parser()
  a = p.parse_args(argv)
  eval_args.check_model_flags(p, a)
  if not os.path.isdir(a.ckpt):
    p.error(f"--ckpt {a.ckpt}: no such directory")
  if a.media_root is not None and not os.path.isdir(a.media_root):
    p.error(f"--media-root {a.media_root}: no such directory")
  for flag in ("slots", "max_frames", "max_tokens", "decode_chunk", "prefill_batch"):
    if getattr(a, flag) < 1:
      p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
  if a.max_queue < 0 or a.max_positions < 2 or a.max_body_mb <= 0 or not 0 <= a.port < 65536 or a.prefill_chunk < 0:
    p.error("--max-queue >= 0, --max-positions >= 2, --max-body-mb > 0, --prefill-chunk >= 0 and a port in "
            "[0, 65535] are needed")
  try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
  except ImportError as e:
    sys.exit(f"error: {e.name} is missing: pip install 'llamavid-jax[serve]'")
  name = a.served_model_name or os.path.basename(os.path.normpath(a.ckpt))
  try:
    sock = listen(a.host, a.port)   # before the model loads: a port in use fails at once
  except OSError as e:
    sys.exit(f"error: --host {a.host} --port {a.port}: {e.strerror}")
  try:
    m = eval_args.load(a)
  except FileNotFoundError as e:
    sys.exit(f"error: --ckpt {e}")
  kv = engine_lib.cache_bytes(m.cfg, a.slots, a.max_positions, a.dtype)
  chunked = f", prompts prefilled {a.prefill_chunk} positions per dispatch" if a.prefill_chunk else ""
  if a.prefill_batch > 1 and not a.prefill_chunk:
    chunked += (f", up to {a.prefill_batch} queued prompts of one shape prefilled together (a group size of a "
                "shape compiles when that many of its requests first wait at once)")
  spans = engine_lib.decode_spans(a.max_positions)
  print(f"eval.serve: {name}: {a.slots} slots x {a.max_positions} positions, KV cache {kv / 2 ** 30:.2f} GiB "
        f"({m.cfg.kv_cache or a.dtype}){chunked}; compiling the decode step for {len(spans)} spans (attention over "
        f"{spans[0]} .. {spans[-1]} slots, the longest row in use deciding)", flush=True)
  eng = engine_lib.Engine(m, slots=a.slots, max_positions=a.max_positions, decode_chunk=a.decode_chunk,
                          max_queue=a.max_queue, prefill_chunk=a.prefill_chunk, prefill_batch=a.prefill_batch)
  limits = Limits(media_root=a.media_root, max_frames=a.max_frames, max_tokens=a.max_tokens,
                  max_body=int(a.max_body_mb * 2 ** 20))
  host = f"[{a.host}]" if ":" in a.host else a.host
  print(f"eval.serve: serving {name!r} on http://{host}:{sock.getsockname()[1]}/v1", flush=True)
  interval = sys.getswitchinterval()
  sys.setswitchinterval(SWITCH_INTERVAL_S)
  try:
    run_server(make_app(eng, name, limits), sock)
  finally:
    sys.setswitchinterval(interval)   # the caller's again (tests run main in their own process)
    eng.close()
    sock.close()


# The interpreter's thread switch interval while serving (default 5 ms): the engine's thread
# gives up the GIL at every dispatch and, under load, waited up to the interval to get it
# back from the request threads (media decoding, tokenizing, SSE). At 0.5 ms, bench/serve.py
# on the 2-core CPU: tiny model, 1 client 787 -> 854 tokens/s, 32 clients 3366 -> 3652.
SWITCH_INTERVAL_S = 0.0005


def run_server(app, sock: socket.socket) -> None:
  """uvicorn serving `app` on the bound `sock` until SIGINT / SIGTERM."""
  import uvicorn
  uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
  """A socket bound to `host`:`port` (0: an ephemeral port); OSError when it cannot be."""
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError:
    sock.close()
    raise
  return sock


if __name__ == "__main__":
  cli.run(main)   # a known error: `error: <one line>`, exit 2 / 1 (--debug: the traceback)
