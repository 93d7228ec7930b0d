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
Video frames are taken at 1 fps (every round(avg_fps)-th frame), CLIP-preprocessed
without padding; images are padded to a square of the mean colour first when the
checkpoint's `image_aspect_ratio` is `pad` (the release's default).

Answers end at the tokenizer's `</s>` (the template's closing separator) and are cut
before any extra stop string. `token_ids` are the generated LLM ids without the
prompt, up to and without the `</s>`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Literal, Sequence

import jax
import numpy as np

from llamavid_jax import generate as gen
from llamavid_jax.checkpoint import orbax_io
from llamavid_jax.data import IMAGE_TOKEN
from llamavid_jax.data.conversation import build_prompt, get_template, tokenize_with_image
from llamavid_jax.models import LlamaVid

CHAT = gen.CHAT   # temperature 0.2, top_p 0.7: the release's chat and video-QA sampling
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
  float32[T, N+1, C] ViT outputs. `path` is where it came from."""

  kind: Literal["frames", "features"]
  array: np.ndarray
  path: str = ""

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


def check_file(path: str, what: str) -> str:
  """Raises FileNotFoundError naming `what` (a flag) unless `path` is a file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path}: no such file")
  return path


def prompt_turns(turns: Sequence[str]) -> list[str]:
  """User / assistant texts (alternating, ending with a user turn) -> the same turns
  with `<image>` removed everywhere and put at the start of the latest user turn."""
  if len(turns) % 2 != 1:
    raise ValueError(f"turns must alternate user, assistant and end with a user turn; got {len(turns)}")
  clean = [t.replace(IMAGE_TOKEN, "").strip() for t in turns]
  clean[-1] = f"{IMAGE_TOKEN}\n{clean[-1]}"
  return clean


def inference_prompt(turns: Sequence[str] | str, template: str = "vicuna_v1") -> str:
  """The release's `conv.get_prompt()` with the assistant's reply left open:
  "{system} USER: <image>\\n{question} ASSISTANT:" for one question."""
  turns = [turns] if isinstance(turns, str) else list(turns)
  t = get_template(template)
  return build_prompt(t, prompt_turns(turns)) + f"{t.roles[1]}:"


class Model:
  """Parameters, config and both tokenizers of one checkpoint (see `load`)."""

  def __init__(self, loaded: orbax_io.Inference, dtype: str = "float32", max_frames: int | None = None):
    self.cfg, self.meta = loaded.cfg, loaded.meta
    # onto the device once: a jitted call copies numpy arguments on every call (every
    # streamed chunk), which for a 7B model is the whole model each time
    self.params = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jax.device_put(a), loaded.params)
    self.tokenizer, self.qtokenizer = loaded.tokenizer, loaded.qformer_tokenizer
    self.model = LlamaVid(self.cfg)
    self.dtype = dtype
    self.max_frames = max_frames
    aspect = self.meta.get("release_config", self.meta).get("image_aspect_ratio", "pad")
    self.image_aspect = "pad" if aspect == "pad" else "crop"
    self.eos_id = self.tokenizer.eos_token_id
    self._attention = jax.jit(lambda p, x: self.model.apply(
        {"params": p}, **x, method=LlamaVid.embed_inputs)[2].get("context_attention"))

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
        from llamavid_jax.data.sources import load_features
        arr, kind = load_features(features)[0], "features"
      elif image:
        from llamavid_jax.data.image import load_image, preprocess_image
        arr = preprocess_image(load_image(image), size=self.cfg.vision.image_size, aspect=self.image_aspect)[None]
        kind = "frames"
      else:
        from llamavid_jax.data.image import preprocess_frames
        from llamavid_jax.data.video import load_video
        frames, _ = load_video(video, fps=1.0)
        arr, kind = preprocess_frames(frames, size=self.cfg.vision.image_size), "frames"
    except (VideoError, SampleError) as e:   # their str() names the path (and a JSON field) again
      raise MediaError(path, f"{e.reason}: {e.detail}") from None
    except OSError as e:   # PIL's UnidentifiedImageError is an OSError
      raise MediaError(path, f"not readable as {'an image' if image else 'media'} ({e})") from None
    if arr.shape[0] == 0:
      raise MediaError(path, "no frames")
    if self.max_frames and arr.shape[0] > self.max_frames:
      raise MediaError(path, f"{arr.shape[0]} frames at 1 fps, more than the cap of {self.max_frames}")
    return Media(kind, np.asarray(arr, np.float32), path)

  # --- requests -------------------------------------------------------------------
  def request(self, turns: Sequence[str] | str, media: Media) -> dict:
    """User / assistant turns ending with the question (or one question) + media ->
    one request for `generate.batch_requests`: input_ids int[S] of the prompt,
    qformer_ids / qformer_mask int[L] of the latest question, the media array."""
    turns = [turns] if isinstance(turns, str) else list(turns)
    q = self.qtokenizer(turns[-1].replace(IMAGE_TOKEN, "").strip(), truncation=True,
                        max_length=self.cfg.qformer.max_text_len)
    return {"input_ids": np.asarray(tokenize_with_image(inference_prompt(turns), self.tokenizer), np.int32),
            "qformer_ids": np.asarray(q.input_ids, np.int32), "qformer_mask": np.asarray(q.attention_mask, bool),
            media.kind: media.array}

  def _batch(self, requests: Sequence[dict], text_buckets, frame_buckets) -> dict:
    return gen.batch_requests(requests, text_buckets=text_buckets, frame_buckets=frame_buckets,
                              pad_id=self.tokenizer.pad_token_id)

  def _answer(self, row: Sequence[int], stop: Sequence[str]) -> Answer:
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
    """Requests (`request`) -> one Answer each, generated as one left-padded batch."""
    batch = self._batch(requests, text_buckets, frame_buckets)
    toks = gen.generate(self.model, self.params, batch, jax.random.key(seed), max_new_tokens=max_new_tokens,
                        eos_id=self.eos_id, temperature=temperature, top_k=top_k, top_p=top_p,
                        prefill_chunk=prefill_chunk, dtype=self.dtype)
    return [self._answer(row, stop) for row in np.asarray(toks).tolist()]

  def stream(self, request: dict, *, max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), chunk: int = 4,
             prefill_chunk: int = 0) -> Iterator[str]:
    """One request -> its answer's text, yielded in pieces as tokens are produced
    (`chunk` tokens per step). The pieces join to `generate`'s text with the same
    arguments; `last_answer` holds the Answer once the stream is exhausted."""
    batch = self._batch([request], None, None)
    ids: list[int] = []
    shown = ""
    self.last_answer = Answer("", [])
    for toks in gen.stream(self.model, self.params, batch, jax.random.key(seed), max_new_tokens=max_new_tokens,
                           eos_id=self.eos_id, chunk=chunk, temperature=temperature, top_k=top_k, top_p=top_p,
                           prefill_chunk=prefill_chunk, dtype=self.dtype):
      ids += toks[0].tolist()
      ans = self._answer(ids, stop)
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
    w = self._attention(self.params, batch)                    # [B, P, T, M, N]
    if w is None:
      return None
    t = int(batch["frame_mask"][0].sum())
    return np.asarray(w[0, 0, :t].mean(1), np.float32)


def load(ckpt: str, *, dtype: str = "float32", step: int | None = None, max_frames: int | None = None) -> Model:
  """A converted / inference directory, or a train WORKDIR (its `step`, default the
  latest) -> Model. `dtype` sets both the stored parameters' and the compute dtype."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
  import jax.numpy as jnp
  loaded = orbax_io.load_for_inference(ckpt, step=step, dtype=getattr(jnp, dtype))
  return Model(loaded, dtype=dtype, max_frames=max_frames)
