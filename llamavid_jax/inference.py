"""A checkpoint loaded for inference: media and questions in, answers out, with the
release's prompts and sampling. `eval.chat`, `eval.web`, `eval.score` and the
benchmark runner are thin layers over this module.

  m = inference.load("out/")                         # converted / inference dir, or a train WORKDIR
  media = m.media(video="clip.mp4")                  # or image=..., features=...
  req = m.request(["What is the man doing?"], media)  # user turns (answers between them)
  [ans] = m.generate([req], max_new_tokens=64)       # Answer(text, token_ids), greedy
  for delta in m.stream(req, **inference.CHAT): ...  # text as it is produced

Prompt (the release's `vicuna_v1` inference prompt, `llamavid/eval/model_*_qa.py` and
`serve/cli.py`): the system text, then the turns, ending in "ASSISTANT:"; the one
`<image>` sits at the start of the LATEST user turn (`<image>\\n` + question; the chat
moves it there every turn), and the latest question is the Q-Former instruction.
Video frames are taken at 1 fps (every round(avg_fps)-th frame; a model trained here
samples as its training data did, `orbax_io.data_provenance`), CLIP-preprocessed
without padding; images are padded to a square of the mean colour first when the
checkpoint's `image_aspect_ratio` is `pad` (the release's default).

Movies (a `.safetensors` feature file with `inputs`, `data/features.py`): the user turn is
the release's `run_llamavid_movie.py` prompt (`conversation.movie_prompt`: start prompt,
`inputs` as stored, end prompt, newline, question), the question is the Q-Former
instruction of every frame, the features go in without CLS and the model runs in
`video_mode="movie"` whatever the checkpoint's config says (so a clip model reads
movies and a movie model clips, as the release picks its path by the input). The
release samples movie answers at temperature 0.6, top_p 0.9 (`MOVIE`).

Answers end at the tokenizer's `</s>` (the template's closing separator) and are cut
before any extra stop string. `token_ids` are the generated LLM ids without the
prompt, up to and without the `</s>`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from typing import Iterator, Literal, Sequence

import jax
import numpy as np

from llamavid_jax import generate as gen
from llamavid_jax import validation
from llamavid_jax.checkpoint import layout, orbax_io
from llamavid_jax.data import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llamavid_jax.data.tokenizer import RemoteCodeError
from llamavid_jax.data.conversation import build_prompt, get_template, movie_prompt, tokenize_with_image
from llamavid_jax.models import LlamaVid
from llamavid_jax.models.config import check_kv_cache

CHAT = gen.CHAT   # temperature 0.2, top_p 0.7: the release's chat and video-QA sampling
MOVIE = dict(temperature=0.6, top_p=0.9)   # the release's movie sampling (run_llamavid_movie.py)
DTYPES = ("float32", "bfloat16")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".gif")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class MediaError(ValueError):
  """A media file that cannot be used: names the file and why."""

  def __init__(self, path: str, why: str):
    super().__init__(f"{path}: {why}")
    self.path, self.why = path, why


@dataclasses.dataclass(frozen=True)
class Media:
  """One video, image or feature file, ready for the model.

  kind `frames`: `array` float32[T, S, S, 3] CLIP-preprocessed; kind `features`:
  float32[T, N+1, C] ViT outputs, or for a movie (`inputs` set: one `<image>` per frame
  with subtitles between) float32[T, N, C] without CLS. `path` is where it came from."""

  kind: Literal["frames", "features"]
  array: np.ndarray
  path: str = ""
  inputs: str | None = None

  @property
  def is_movie(self) -> bool:
    return self.inputs is not None

  @property
  def num_frames(self) -> int:
    return int(self.array.shape[0])


@dataclasses.dataclass(frozen=True)
class Answer:
  text: str
  token_ids: list[int]


def media_kind(path: str) -> Literal["video", "image", "features"]:
  """Guesses a file's kind from its suffix (uploads in the web demo)."""
  ext = os.path.splitext(path)[1].lower()
  if ext in (".npy", ".safetensors"):
    return "features"
  if ext in IMAGE_SUFFIXES:
    return "image"
  return "video"


class CheckpointError(ValueError):
  """A --ckpt that is no checkpoint directory (`check_ckpt`: one message naming the
  flag), or a checkpoint whose files cannot be read (`path` and `why`: names the file
  or directory and why)."""

  def __init__(self, path: str, why: str | None = None):
    super().__init__(path if why is None else f"{path}: {why}")
    self.path, self.why = path, why


def check_ckpt(path: str, flag: str = "--ckpt") -> str:
  """Raises CheckpointError (one line naming `flag`) unless `path` is a converted /
  inference directory or a train WORKDIR (`checkpoint.layout`); no file is read."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{flag} {path}: no such directory")
  if layout.kind(path) is None:
    raise CheckpointError(f"{flag} {layout.neither(path)}")
  return path


def check_file(path: str, what: str) -> str:
  """Raises FileNotFoundError naming `what` (a flag) unless `path` is a file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path}: no such file")
  return path


def prompt_turns(turns: Sequence[str], media: bool = True) -> list[str]:
  """User / assistant texts (alternating, ending with a user turn) -> the same turns as
  typed (no stripping: the release puts them into the prompt as they are) with
  `<image>` removed everywhere (`<image>\\n` first, as the release's chat removes it from
  earlier turns) and, with media, put at the start of the latest user turn."""
  if len(turns) % 2 != 1:
    raise ValueError(f"turns must alternate user, assistant and end with a user turn; got {len(turns)}")
  bad = [i for i, t in enumerate(turns) if not isinstance(t, str)]
  if bad:
    raise ValueError(f"turn {bad[0]} is a {type(turns[bad[0]]).__name__}, not text")
  clean = [t.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "") for t in turns]
  if media:
    clean[-1] = f"{IMAGE_TOKEN}\n{clean[-1]}"
  return clean


def inference_prompt(turns: Sequence[str] | str, template: str = "vicuna_v1", media: bool = True) -> str:
  """The release's `conv.get_prompt()` with the assistant's reply left open:
  "{system} USER: <image>\\n{question} ASSISTANT:" for one question (no `<image>`
  for a text-only question)."""
  turns = [turns] if isinstance(turns, str) else list(turns)
  t = get_template(template)
  return build_prompt(t, prompt_turns(turns, media)) + f"{t.roles[1]}:"


class Model:
  """Parameters, config and both tokenizers of one checkpoint (see `load`)."""

  def __init__(self, loaded: orbax_io.Inference, dtype: str = "float32", max_frames: int | None = None,
               quant: str | None = None, kv_cache: str | None = None, mesh: jax.sharding.Mesh | None = None):
    # kv_cache: the decoding cache's stored format ("int8"; None: the config's, by default
    # the compute dtype). mesh: where the parameters lie (`load`); decoding runs on it
    self.cfg, self.meta = loaded.cfg, loaded.meta
    if kv_cache is not None:
      self.cfg = dataclasses.replace(self.cfg, kv_cache=kv_cache)
    self.mesh = mesh
    self.cfg = _ring_on(self.cfg, mesh)
    # onto the device once: a jitted call copies numpy arguments on every call (every
    # streamed chunk), which for a 7B model is the whole model each time. Quantized
    # (llamavid_jax/quant.py): the LLM's kernels go over one at a time and only their
    # quantized arrays stay (already so when `load` read them with quant.reader); the
    # model is then Qwix's PTQ wrapper of LlamaVid.
    self.quant = quant
    if quant is None:
      self.params = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jax.device_put(a), loaded.params)
      self.model = LlamaVid(self.cfg)
    else:
      from llamavid_jax import quant as Q
      self.model, self.params = Q.quantize(LlamaVid(dataclasses.replace(self.cfg, dtype=dtype)), loaded.params, quant)
    self.tokenizer, self.qtokenizer = loaded.tokenizer, loaded.qformer_tokenizer
    self.dtype = dtype
    self.max_frames = max_frames
    # True: requests may run past llm.max_positions x rope_scaling (what a RoPE
    # extrapolation study measures, eval.needle); the budget is otherwise enforced
    self.extrapolate = False
    aspect = self.meta.get("release_config", self.meta).get("image_aspect_ratio", "pad")
    self.image_aspect = "pad" if aspect == "pad" else "crop"
    # frame sampling: the training run's (orbax_io.data_provenance), else the release's 1 fps
    self.video_fps, self.sample_cap = self.meta.get("video_fps", 1.0), self.meta.get("max_frames")
    self.eos_id = self.tokenizer.eos_token_id
    self._attention = jax.jit(lambda model, p, x: model.apply(
        {"params": p}, **x, method=LlamaVid.embed_inputs)[2].get("context_attention"), static_argnums=0)

  ckpt: str | None = None   # where `load` read it (named in the out-of-memory plan command)

  def on_mesh(self):
    """The context every computation of this model runs in: its mesh (`jax.set_mesh`,
    `load(mesh=)`: `data` splits request rows, the model replicated; `sequence` the
    prompt's positions, by ring attention, and the KV cache along its length)
    and the training's logical rules (`sharding.LOGICAL_RULES`), so activations and the
    KV cache are laid out as the parameters are (batch rows over data x fsdp, the LLM
    length and the cache's slots over sequence, heads over tensor); nothing without a mesh."""
    if self.mesh is None:
      return contextlib.nullcontext()
    from flax import linen as nn
    from llamavid_jax import sharding
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
    return stack

  def memory(self, what: str, batch: dict | None = None, max_new_tokens: int | None = None,
             model: LlamaVid | None = None):
    """`validation.device_memory` for this model: an out-of-device-memory error in `what`
    names `python -m train.plan --inference` with its checkpoint, prompt (`batch` run by
    `model`, default this model's) and quant."""
    seq = gen.prompt_length(model or self.model, batch) if batch is not None else None
    rows = len(batch["input_ids"]) if batch is not None else None
    return validation.device_memory(what, ckpt=self.ckpt, seq_len=seq, new_tokens=max_new_tokens, quant=self.quant,
                                    rows=rows, dtype=self.dtype, kv_cache=self.cfg.kv_cache)

  REPLACEABLE = ("cfg", "dtype", "max_frames", "video_fps", "sample_cap", "image_aspect", "extrapolate")

  def replace(self, **changes) -> "Model":
    """A new Model with `changes` (attributes of REPLACEABLE), sharing this one's
    parameters and tokenizers (dataclasses.replace style; this one is unchanged). A new
    `cfg` must keep the parameters' shapes; the module is rebuilt from it."""
    bad = sorted(set(changes) - set(self.REPLACEABLE))
    if bad:
      raise TypeError(f"Model.replace: {bad} cannot be replaced (only {', '.join(self.REPLACEABLE)})")
    new = copy.copy(self)
    vars(new).update(changes)
    if "cfg" in changes:   # clone: a quantized model keeps its Qwix wrapper
      new.model = self.model.clone(cfg=new.cfg)
    return new

  @property
  def sampling(self) -> str:
    """How video frames are taken, in words: "1 fps", "every frame, at most 4"."""
    s = f"{self.video_fps:g} fps" if self.video_fps else "every frame"
    return s + (f", at most {self.sample_cap}" if self.sample_cap else "")

  # --- media ----------------------------------------------------------------------
  def media(self, *, video: str | None = None, image: str | None = None,
            features: str | None = None) -> Media:
    """One of video / image / features (a path) -> Media. Raises MediaError for a file
    that is not a video / image, has no frames, or has more than `max_frames`."""
    from llamavid_jax.data import SampleError
    from llamavid_jax.data.video import VideoError
    path = video or image or features
    try:
      if features:
        from llamavid_jax.data.sources import load_movie
        movie = load_movie(features)
        if movie.inputs is not None:   # the release's long video: features without CLS
          return self._checked(Media("features", np.asarray(movie.feats[:, 1:], np.float32), features, movie.inputs))
        arr, kind = movie.feats, "features"
      elif image:
        from llamavid_jax.data.image import load_image
        return self.image_media(load_image(image), image)
      else:
        from llamavid_jax.data.image import preprocess_frames
        from llamavid_jax.data.video import load_video
        if not self.sample_cap:   # a checkpoint without a frame cap: refuse before decoding
          self._check_video_length(video)
        frames, _ = load_video(video, fps=self.video_fps, max_frames=self.sample_cap)
        arr, kind = preprocess_frames(frames, size=self.cfg.vision.image_size), "frames"
    except (VideoError, SampleError) as e:   # their str() names the path (and a JSON field) again
      raise MediaError(path, f"{e.reason}: {e.detail}") from None
    except OSError as e:   # PIL's UnidentifiedImageError is an OSError
      raise MediaError(path, f"not readable as {'an image' if image else 'media'} ({e})") from None
    return self._checked(Media(kind, np.asarray(arr, np.float32), path))

  def _checked(self, media: Media) -> Media:
    if media.num_frames == 0:
      raise MediaError(media.path, "no frames")
    bad = media.array.size - int(np.isfinite(media.array).sum())
    if bad:
      raise MediaError(media.path, f"{bad:,} of {media.array.size:,} values are NaN or infinite")
    if self.max_frames and media.num_frames > self.max_frames:
      raise MediaError(media.path, f"{media.num_frames} frames at {self.sampling}, more than the cap of {self.max_frames}")
    return media

  @property
  def position_budget(self) -> int:
    """LLM positions of the model: llm.max_positions x rope_scaling (`validation`)."""
    return validation.position_budget(self.cfg)

  @property
  def default_frame_cap(self) -> int:
    """The frames a video may give when the checkpoint stores no cap (`validation`)."""
    return validation.default_frame_cap(self.cfg)

  def _check_video_length(self, path: str) -> None:
    """MediaError before decoding when the frames taken from `path` cannot fit the budget."""
    from llamavid_jax.data.sources import probe_video, sampled_frame_count
    try:
      n, avg_fps = probe_video(path)
    except Exception:   # noqa: BLE001  (unreadable: load_video names it)
      return
    t = sampled_frame_count(n, avg_fps, self.video_fps, None)
    cap = self.default_frame_cap if not self.extrapolate else t
    if self.max_frames and t > self.max_frames:   # the caller's cap (eval.web's --max-frames), before decoding
      raise MediaError(path, f"{t:,} frames at {self.sampling}, more than the cap of {self.max_frames}")
    if t > cap:
      k = self.cfg.tokens_per_frame
      raise MediaError(path, f"{t:,} frames at {self.sampling} need {t * k:,} LLM positions ({k} a frame); the "
                             f"model has {self.position_budget:,} (llm.max_positions x rope_scaling), room for "
                             f"at most {cap:,} frames")

  def check_request(self, request: dict, max_new_tokens: int = 0, what: str = "") -> int:
    """Raises validation.BudgetError unless the request's prompt, frames and
    max_new_tokens fit the model's positions -> the positions it needs."""
    ids = np.asarray(request["input_ids"])
    arr = request.get("frames", request.get("features"))
    if self.extrapolate:
      return max_new_tokens + validation.request_positions(
          self.cfg, len(ids), 0 if arr is None else int(arr.shape[0]), movie=request.get("video_mode") == "movie",
          placeholders=int((ids == IMAGE_TOKEN_INDEX).sum()))
    return validation.check_positions(
        self.cfg, prompt_ids=len(ids), num_frames=0 if arr is None else int(arr.shape[0]),
        max_new_tokens=max_new_tokens, movie=request.get("video_mode") == "movie",
        placeholders=int((ids == IMAGE_TOKEN_INDEX).sum()), what=what)

  def room(self, request: dict) -> int:
    """How many new tokens fit after the request's prompt and frames (>= 1; BudgetError
    naming the positions when not even one does)."""
    return self.position_budget - self.check_request(request, 1) + 1

  def check_generation(self, requests: Sequence[dict], *, max_new_tokens: int, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, prefill_chunk: int = 0) -> None:
    """Sampling values and every request's positions, checked before anything compiles."""
    errs = validation.check_sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                                     max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk, prefix="")
    if prefill_chunk and _length_shards(self.mesh) > 1:
      errs.append(f"prefill_chunk {prefill_chunk} with the LLM length split over {_length_shards(self.mesh)} devices "
                  f"(mesh sequence): a split prompt prefills at once (prefill_chunk 0)")
    validation.raise_all(errs)
    for r in requests:
      self.check_request(r, max_new_tokens)

  def image_media(self, img, path: str = "") -> Media:
    """A PIL image -> Media: padded to a square of the mean colour when the checkpoint's
    `image_aspect_ratio` is `pad`, then CLIP-preprocessed."""
    from llamavid_jax.data.image import preprocess_image, to_rgb
    arr = preprocess_image(to_rgb(img), size=self.cfg.vision.image_size, aspect=self.image_aspect)[None]
    return self._checked(Media("frames", np.asarray(arr, np.float32), path))

  def frames_media(self, images: Sequence, path: str = "") -> Media:
    """PIL images, the frames of one clip in order -> Media: each CLIP-preprocessed as a
    video's frames are (resized and centre-cropped, never padded, as the release's video
    path); a lone image goes through `image_media` instead."""
    from llamavid_jax.data.image import preprocess_frames, to_rgb
    arr = preprocess_frames([np.asarray(to_rgb(im)) for im in images], size=self.cfg.vision.image_size)
    return self._checked(Media("frames", np.asarray(arr, np.float32), path))

  # --- requests -------------------------------------------------------------------
  def prompt(self, turns: Sequence[str] | str, media: Media | None) -> str:
    """The prompt text of `request` (ending in "ASSISTANT:"): a movie's latest turn is
    `movie_prompt`; otherwise `<image>` starts the latest turn when there is media."""
    turns = [turns] if isinstance(turns, str) else list(turns)
    if media is not None and media.is_movie:
      turns = prompt_turns(turns, media=False)
      turns[-1] = movie_prompt(media.inputs, turns[-1])
      t = get_template("vicuna_v1")
      return build_prompt(t, turns) + f"{t.roles[1]}:"
    return inference_prompt(turns, media=media is not None and media.num_frames > 0)

  def request(self, turns: Sequence[str] | str, media: Media | None, instruction: str | None = None) -> dict:
    """User / assistant turns ending with the question (or one question) + media (None:
    a text-only question, zero frames) -> one request for `generate.batch_requests`:
    input_ids int[S] of the prompt, qformer_ids / qformer_mask int[L] of the Q-Former
    instruction (default: the latest question), the media array; a movie's request
    carries `video_mode="movie"` (the latest turn becomes `movie_prompt`)."""
    turns = [turns] if isinstance(turns, str) else list(turns)
    if instruction is None:   # the release's `update_prompt([[question]])`: the question as typed
      instruction = turns[-1].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
    q = self.qtokenizer(instruction, truncation=True, max_length=self.cfg.qformer.max_text_len)
    if media is None:
      s = self.cfg.vision.image_size
      media = Media("frames", np.zeros((0, s, s, 3), np.float32))
    return {"input_ids": np.asarray(tokenize_with_image(self.prompt(turns, media), self.tokenizer), np.int32),
            "qformer_ids": np.asarray(q.input_ids, np.int32), "qformer_mask": np.asarray(q.attention_mask, bool),
            media.kind: media.array, "video_mode": "movie" if media.is_movie else "clip"}

  def model_for(self, requests: Sequence[dict]) -> LlamaVid:
    """The model in the requests' `video_mode` (one for the whole batch)."""
    modes = {r.get("video_mode", "clip") for r in requests}
    if len(modes) != 1:
      raise ValueError(f"one batch takes one video_mode, got {sorted(modes)}")
    mode = modes.pop()
    return self.model if mode == self.cfg.video_mode else self.model.clone(cfg=dataclasses.replace(self.cfg, video_mode=mode))

  @property
  def batch_shards(self) -> int:
    """Devices the mesh splits request rows over (the logical `batch`: data x fsdp), the
    model whole or split (tensor) on each; 1 without a mesh."""
    if self.mesh is None:
      return 1
    from llamavid_jax import sharding
    return sharding.shards(self.mesh, sharding.logical_to_spec(("batch",))[0])

  def _batch(self, requests: Sequence[dict], text_buckets, frame_buckets) -> dict:
    """One batch of the requests (`generate.batch_requests`), its rows the requests' and,
    on a mesh that splits rows over n devices, copies of the last one up to a multiple
    of n (so that every device takes its rows; callers keep the first len(requests))."""
    requests = list(requests)
    pad = -len(requests) % self.batch_shards
    if pad:
      gen.decide(f"{len(requests)} request rows on {self.batch_shards} devices: {pad} copies of the last added "
              f"(computed, dropped) so that the rows split")
    return gen.batch_requests(requests + requests[-1:] * pad, text_buckets=text_buckets, frame_buckets=frame_buckets,
                              pad_id=self.tokenizer.pad_token_id)

  def answer(self, row: Sequence[int], stop: Sequence[str] = ()) -> Answer:
    """Generated ids -> Answer: cut at eos, then before the first stop string (the ids
    kept are those whose text ends before it)."""
    row = list(row)
    row = row[:row.index(self.eos_id)] if self.eos_id in row else row
    text = self.tokenizer.decode(row, skip_special_tokens=True)
    cut = min([i for i in (text.find(s) for s in stop if s) if i >= 0], default=None)
    if cut is not None:   # keep the ids whose text ends before the stop string
      text = text[:cut]
      while row and len(self.tokenizer.decode(row, skip_special_tokens=True).rstrip()) > len(text.rstrip()):
        row = row[:-1]
    return Answer(text.strip(), [int(t) for t in row])

  # --- generation -----------------------------------------------------------------
  def generate(self, requests: Sequence[dict], *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
               prefill_chunk: int = 0, text_buckets: Sequence[int] | None = None,
               frame_buckets: Sequence[int] | None = None) -> list[Answer]:
    """Requests (`request`) -> one Answer each, generated as one left-padded batch.
    Raises validation.UsageError / BudgetError before compiling (`check_generation`)."""
    self.check_generation(requests, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, prefill_chunk=prefill_chunk)
    batch = self._batch(requests, text_buckets, frame_buckets)
    with self.memory("generate", batch, max_new_tokens, self.model_for(requests)), self.on_mesh():
      toks = gen.generate(self.model_for(requests), self.params, batch, jax.random.key(seed),
                          max_new_tokens=max_new_tokens, eos_id=self.eos_id, temperature=temperature, top_k=top_k,
                          top_p=top_p, prefill_chunk=prefill_chunk, dtype=self.dtype,
                          ended=gen.stop_check(self.tokenizer, self.eos_id, stop))
    return [self.answer(row, stop) for row in np.asarray(toks)[:len(requests)].tolist()]

  def stream(self, request: dict, *, max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), chunk: int = 4,
             prefill_chunk: int = 0) -> Iterator[str]:
    """One request -> its answer's text, yielded in pieces as tokens are produced
    (`chunk` tokens per step). The pieces join to `generate`'s text with the same
    arguments; `last_answer` holds the Answer once the stream is exhausted."""
    self.check_generation([request], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, prefill_chunk=prefill_chunk)
    batch = self._batch([request], None, None)
    ids: list[int] = []
    shown = ""
    self.last_answer = Answer("", [])
    chunks = gen.stream(self.model_for([request]), self.params, batch, jax.random.key(seed),
                        max_new_tokens=max_new_tokens, eos_id=self.eos_id, chunk=chunk, temperature=temperature,
                        top_k=top_k, top_p=top_p, prefill_chunk=prefill_chunk, dtype=self.dtype)
    memory = lambda: self.memory("generate", batch, max_new_tokens, self.model_for([request]))
    for toks in _out_of_memory_named(chunks, memory, self.on_mesh):
      ids += toks[0].tolist()
      ans = self.answer(ids, stop)
      done = self.eos_id in ids or len(ans.token_ids) < len(ids)
      text = ans.text if done else self.tokenizer.decode(ids, skip_special_tokens=True).strip()
      if "\ufffd" not in text[len(shown):] or done:   # wait for a whole multi-byte character
        if text.startswith(shown) and len(text) > len(shown):
          yield text[len(shown):]
          shown = text
      self.last_answer = ans
      if done:
        break

  def context_attention(self, request: dict) -> np.ndarray | None:
    """float32[T, N]: the context token's Eq. 1 attention over each frame's patches
    (mean over the Q-Former queries), or None for a content-only model."""
    batch = self._batch([request], None, None)
    with self.on_mesh():
      w = self._attention(self.model_for([request]), self.params, batch)   # [B, P, T, M, N]
    if w is None:
      return None
    t = int(batch["frame_mask"][0].sum())
    return np.asarray(w[0, 0, :t].mean(1), np.float32)


def _length_shards(mesh) -> int:
  """Devices `mesh` splits the LLM length over (the logical `length`: sequence); 1 without."""
  from llamavid_jax import sharding
  return 1 if mesh is None else sharding.shards(mesh, sharding.logical_to_spec(("length",))[0])


def _ring_on(cfg, mesh):
  """cfg with the LLM's attention as a ring where `mesh` splits the LLM length (the
  logical `length` axis: `sequence`), so that a prompt prefills split over those devices
  and decoding reads the cache where it lies; printed as a decision. An attention that
  already rings (`attention.RING_IMPLS`: ring, splash, auto) is kept."""
  from llamavid_jax.ops import attention
  n = _length_shards(mesh)
  if n <= 1 or cfg.attention_impl in attention.RING_IMPLS:
    return cfg
  gen.decide(f"mesh {dict(mesh.shape)} splits the LLM length over {n} devices: LLM attention "
          f"{cfg.attention_impl!r} -> 'ring' (prefill split over them, the KV cache sharded along its length)")
  return dataclasses.replace(cfg, attention_impl="ring")


def _out_of_memory_named(chunks: Iterator, memory, on_mesh) -> Iterator:
  """`chunks` with an out-of-device-memory error while producing one re-raised by a
  `memory()` context (`Model.memory`), each produced on the model's mesh (`on_mesh()`)."""
  while True:
    with memory(), on_mesh():
      try:
        toks = next(chunks)
      except StopIteration:
        return
    yield toks


def load(ckpt: str, *, dtype: str = "float32", step: int | None = None, max_frames: int | None = None,
         quant: str | None = None, mesh: jax.sharding.Mesh | None = None, kv_cache: str | None = None) -> Model:
  """A converted / inference directory, or a train WORKDIR (its `step`, default the
  latest) -> Model. `dtype` sets both the stored parameters' and the compute dtype.
  `quant` "int8" | "int4" quantizes the LLM's weights with Qwix (llamavid_jax/quant.py)
  a leaf at a time as they are read; a quantized checkpoint (`quant.save`) loads as
  stored in its own mode (quant None or that mode; another is refused). An unknown mode
  is refused before anything is read. `kv_cache` "int8" stores the decoding KV cache as
  int8 with a float32 scale per (row, slot, head) (`llama.cache_spec`; None: the compute
  dtype), checked before anything is read too. `mesh` (`sharding.make_mesh`)
  restores an inference directory's parameters sharded by the training's logical rules
  (`sharding.LOGICAL_RULES`: tensor and fsdp); decoding then runs on that mesh. With
  `quant`, each quantized kernel's int values are placed as its float kernel and its
  scales along the same output axes (`quant.Plan.placement`; an array that cannot split
  as its names ask is printed before loading)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
  from llamavid_jax import quant as Q
  quant = Q.check_stored(ckpt, quant)   # a quantized checkpoint loads in its own mode (another: refused)
  check_kv_cache(kv_cache)
  import jax.numpy as jnp
  cfg_file = os.path.join(ckpt, orbax_io.MODEL_CONFIG)
  if os.path.isfile(cfg_file):   # a bad config is named before any parameter is read
    try:
      orbax_io.load_config(ckpt)
    except Exception as e:   # noqa: BLE001  (JSONDecodeError, TypeError of an unknown field, ...)
      raise CheckpointError(cfg_file, f"not a model config: {type(e).__name__}: {validation.one_line(e, 300)}") from None
  memory = lambda: validation.device_memory("loading the checkpoint", ckpt=ckpt, quant=quant, dtype=dtype,
                                            kv_cache=kv_cache)
  try:
    with memory(), validation.held_logs():   # a torn checkpoint: our one line, not orbax's warning too
      loaded = orbax_io.load_for_inference(ckpt, step=step, dtype=getattr(jnp, dtype), mesh=mesh,
                                           read_params=None if quant is None else Q.reader(quant, dtype, mesh))
  except (FileNotFoundError, RemoteCodeError, validation.DeviceMemoryError):   # named already
    raise
  except Exception as e:   # noqa: BLE001  (orbax / tensorstore on a torn or garbled parameter file)
    raise CheckpointError(ckpt, f"corrupt or unreadable checkpoint (its parameters or their metadata, "
                                f"e.g. params/_METADATA): {type(e).__name__}: {validation.one_line(e, 300)}") from None
  with memory():
    m = Model(loaded, dtype=dtype, max_frames=max_frames, quant=quant, kv_cache=kv_cache, mesh=mesh)
  m.ckpt = ckpt
  return m
