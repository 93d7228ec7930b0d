"""Random-access sources of raw samples: the release's LLaVA JSON + media folders.

JSON format (the release's): a list of samples
  {"id": str, "conversations": [{"from": "human"|"gpt", "value": str}, ...],
   "image": "rel/path.jpg"}          an image under `image_folder`, or
   "video": "rel/path.mp4"}          a video under `video_folder`, or
   "video": "rel/path.npy"|".safetensors"}  precomputed long-video features
                                     float32[T, N+1, C] (EVA-g: N+1 = 257, C = 1408)
or neither (text only). The release's pickled features (`.pkl`) are refused here: never
unpickle data files; `python -m llamavid_jax.data.features convert` turns them into
`.safetensors` (reading them without running them). A `.safetensors` feature file holds one
tensor (or one named `features`) and may carry `prompt` (the Q-Former instruction) and
`inputs` (a movie's `<image>` + subtitles text, `features.Movie`) metadata strings.

A source returns `RawSample`s by index (`src[i]`, cheap, picklable) and knows each
sample's frame count cheaply (`num_frames`, by `frames.frame_count`: the rule the
decoder picks frames by) so the pipeline can bucket before any decoding. Media are
decoded later, in the pipeline's workers (`media.decode`). Probing raises an I/O hiccup
(`is_transient`: EIO, ETIMEDOUT, ESTALE, ...) as `OSError`, for the planner to retry; any
other failure is a `SampleError`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from typing import Any, Literal, Protocol

import numpy as np

from llamavid_jax.data import DataError, SampleError
from llamavid_jax.data import features as features_lib
from llamavid_jax.data import frames as frames_lib

MediaKind = Literal["none", "image", "video", "features", "frames"]
FEATURE_SUFFIXES = (".npy", ".safetensors")


@dataclasses.dataclass(frozen=True)
class RawSample:
  """One sample before tokenization and decoding.

  Attributes:
    index: position in the source.
    id: the sample's `id` (or its index as a string if it has none).
    conversations: the LLaVA `conversations` list.
    kind: `none` (text only), `image`, `video` (a file to decode), `features`
      (a feature file, or `features` already loaded) or `frames` (uint8 frames
      already resized and cropped, from the TFDS builder).
    path: the media file, if any.
    frames: uint8[T, S, S, 3] for kind `frames`.
    features: float32[T, N+1, C] for kind `features` read from TFDS.
    prompt: the Q-Former instruction stored with features, if any.
  """

  index: int
  id: str
  conversations: Any
  kind: MediaKind = "none"
  path: str | None = None
  frames: np.ndarray | None = None
  features: np.ndarray | None = None
  prompt: str | None = None

  @property
  def has_media(self) -> bool:
    return self.kind != "none"


class Source(Protocol):
  """What the pipeline needs from a source."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> RawSample: ...

  def num_frames(self, sample: RawSample, *, fps: float | None, max_frames: int | None) -> int:
    """Frames (or feature steps) the sample will have; raises `SampleError`."""


def sampled_frame_count(num_frames: int, avg_fps: float, fps: float | None,
                        max_frames: int | None) -> int:
  """Frames kept of a video of `num_frames` at `avg_fps`: `frames.frame_count`."""
  return frames_lib.frame_count(num_frames, avg_fps, fps, max_frames)


# errnos of an I/O hiccup (a network file system, a busy disk), not of a bad file: probing
# re-raises them as OSError so the planner retries (`plan.with_retries`); a missing, unreadable
# or corrupt file stays a `SampleError` (a counted skip).
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY,
                              errno.ECONNRESET, errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH,
                              errno.EHOSTUNREACH, errno.ENOLCK})


def is_transient(e: BaseException) -> bool:
  """Whether `e` is an I/O error worth retrying (`TRANSIENT_ERRNOS`)."""
  return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


PICKLE_REFUSED = ("pickled features are not read (unsafe); convert them to .safetensors with "
                  "`python -m llamavid_jax.data.features convert`")


def refuse_pickle(sample: RawSample) -> None:
  """Raises `SampleError` (`pickle_features`) for the release's `.pkl` features."""
  if sample.path and sample.path.endswith(".pkl"):
    raise SampleError("pickle_features", "video", PICKLE_REFUSED, sample.path)


def probe_video(path: str) -> tuple[int, float]:
  """(frame count, average fps) of a video from its container, without decoding.

  Raises `SampleError` (field `video`) with the tags of `video.VideoError`:
  `missing_file`, `no_video_stream`, `unreadable_video`, `empty_video`."""
  import av

  if not os.path.exists(path):
    raise SampleError("missing_file", "video", "file not found", path)
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise SampleError("no_video_stream", "video", "no video stream", path)
      stream = container.streams.video[0]
      avg_fps = float(stream.average_rate or stream.guessed_rate or 0)
      n = stream.frames
      if not n and stream.duration and stream.time_base:
        n = int(round(float(stream.duration * stream.time_base) * avg_fps))
  except (av.error.FFmpegError, OSError, ValueError) as e:
    if is_transient(e):
      raise
    raise SampleError("unreadable_video", "video", f"{type(e).__name__}: {e}", path) from None
  if n <= 0 or avg_fps <= 0:
    raise SampleError("empty_video", "video", f"{n} frames at {avg_fps} fps", path)
  return n, avg_fps


def _sample_error(e: features_lib.MovieError) -> SampleError:
  return SampleError(e.reason, "video", e.detail, e.path)


def feature_file_shape(path: str) -> tuple[int, ...]:
  """Shape of a `.npy` / `.safetensors` feature file, read from its header only."""
  if not os.path.exists(path):
    raise SampleError("missing_file", "video", "file not found", path)
  try:
    if path.endswith(".npy"):
      return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
      return tuple(f.get_slice(features_lib.tensor_key(f.keys(), path)).get_shape())
  except features_lib.MovieError as e:
    raise _sample_error(e) from None
  except features_lib.file_errors() as e:
    if is_transient(e):
      raise
    raise SampleError("unreadable_features", "video", f"{type(e).__name__}: {e}", path) from None


def load_movie(path: str) -> features_lib.Movie:
  """The features (stored dtype), `inputs` and `prompt` of a `.npy` / `.safetensors`
  feature file (`features.read_movie`: [T > 0, N+1, C], T placeholders in `inputs`).
  Raises `SampleError` (field `video`): `pickle_features` for a `.pkl`, `missing_file`,
  `unreadable_features`, `bad_features`, `bad_inputs`."""
  if path.endswith(".pkl"):
    raise SampleError("pickle_features", "video", PICKLE_REFUSED, path)
  try:
    return features_lib.read_movie(path)
  except features_lib.MovieError as e:
    raise _sample_error(e) from None


def load_features(path: str) -> tuple[np.ndarray, str | None]:
  """float32[T, N+1, C] features and the optional stored Q-Former prompt (`load_movie`)."""
  movie = load_movie(path)
  return movie.feats.astype(np.float32), movie.prompt


MISSING_INPUTS = ("a movie needs its `inputs` text (one <image> per frame, subtitles between): a "
                  ".safetensors file with `inputs` metadata (`python -m llamavid_jax.data.features convert`)")


def movie_header(path: str) -> tuple[tuple[int, ...], str]:
  """Shape [T, N+1, C] and `inputs` of a movie feature file, from its header only (the
  planning pass reads no features). Raises `SampleError` (field `video`): `missing_file`,
  `unreadable_features`, `bad_features`, `missing_inputs` (a `.npy`, or no `inputs`
  metadata), `bad_inputs` (placeholders != frames, both counts named)."""
  shape = feature_file_shape(path)
  if len(shape) != 3 or shape[0] == 0:
    raise SampleError("bad_features", "video", f"expected [T, N+1, C], got {shape}", path)
  inputs = None
  if path.endswith(".safetensors"):
    from safetensors import safe_open

    try:
      with safe_open(path, framework="numpy") as f:
        inputs = (f.metadata() or {}).get("inputs")
    except features_lib.file_errors() as e:
      if is_transient(e):
        raise
      raise SampleError("unreadable_features", "video", f"{type(e).__name__}: {e}", path) from None
  if inputs is None:
    raise SampleError("missing_inputs", "video", MISSING_INPUTS, path)
  try:
    features_lib.check_inputs(inputs, shape[0], path)
  except features_lib.MovieError as e:
    raise _sample_error(e) from None
  return shape, inputs


class LlavaJsonSource:
  """The release's LLaVA-format JSON list, with media folders.

  Args:
    json_path: the JSON file (a list of samples).
    image_folder: folder that `image` paths are relative to.
    video_folder: folder that `video` paths are relative to (videos and features).
  """

  def __init__(self, json_path: str, *, image_folder: str = "", video_folder: str = ""):
    self.json_path = json_path
    self.image_folder, self.video_folder = image_folder, video_folder
    try:
      with open(json_path) as f:
        self._items = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"cannot read dataset {json_path}: {type(e).__name__}: {e}") from None
    if not isinstance(self._items, list):
      raise DataError(f"{json_path}: expected a JSON list of samples, got {type(self._items).__name__}")

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> RawSample:
    item = self._items[index]
    if not isinstance(item, dict):
      return RawSample(index, str(index), None)
    sid = str(item.get("id", index))
    conv = item.get("conversations")
    if item.get("image") is not None:
      return RawSample(index, sid, conv, "image", os.path.join(self.image_folder, item["image"]))
    if item.get("video") is not None:
      path = os.path.join(self.video_folder, item["video"])
      kind = "features" if path.endswith(FEATURE_SUFFIXES) else "video"
      return RawSample(index, sid, conv, kind, path)
    return RawSample(index, sid, conv)

  def num_frames(self, sample: RawSample, *, fps: float | None, max_frames: int | None) -> int:
    if sample.kind == "none":
      return 0
    if sample.kind == "image":
      if not os.path.exists(sample.path):
        raise SampleError("missing_file", "image", "file not found", sample.path)
      return 1
    refuse_pickle(sample)
    if sample.kind == "features":
      shape = feature_file_shape(sample.path)
      if len(shape) != 3 or shape[0] == 0:
        raise SampleError("bad_features", "video", f"expected [T, N+1, C], got {shape}", sample.path)
      return len(frames_lib.uniform_cap(shape[0], max_frames))
    n, avg_fps = probe_video(sample.path)
    return sampled_frame_count(n, avg_fps, fps, max_frames)
