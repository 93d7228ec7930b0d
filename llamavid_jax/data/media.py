"""Media decoding: a `RawSample`'s image, video, stored frames or features -> arrays.

One decoder for the pipeline and the TFDS builder:
  - `decode_pixels` opens an image or a video (video: the frame choice of
    `frames.frame_indices` at `fps`, capped at `max_frames`) and returns the uint8
    resize + center crop (images padded to a square first with aspect `pad`); stored
    uint8 frames (TFDS) are checked and passed through. The TFDS builder stores this.
  - `decode_features` reads a feature file (or the features already loaded from
    TFDS), checks their shape against the model's and applies the `max_frames` cap.
  - `decode` is what the pipeline's rows hold: the pixels CLIP-normalized
    (float32[T, S, S, 3]: bit-identical to preprocessing the file, see `image`) or the
    features float32[T, N+1, C], and the Q-Former prompt stored with features.

  - `decode_movie` (movie mode) reads a movie feature file: its features without CLS
    ([T, N, C], stored dtype) and its `inputs`; a movie is never resampled.

Errors are `SampleError`s naming the field and file: `missing_file`,
`unreadable_image`, `no_video_stream`, `unreadable_video`, `empty_video`,
`pickle_features`, `unreadable_features`, `bad_features`, `bad_inputs` (a movie's
`inputs` placeholders do not match its frames), `missing_inputs`, `not_a_movie`,
`too_long` (a movie past `max_frames`), `bad_frames`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from llamavid_jax.data import SampleError
from llamavid_jax.data import frames as frames_lib
from llamavid_jax.data import image as image_lib
from llamavid_jax.data import sources as sources_lib

if TYPE_CHECKING:
  from llamavid_jax.models.config import InputSpec


def decode_pixels(sample: sources_lib.RawSample, *, image_size: int, image_aspect: str = "pad",
                  fps: float | None = 1.0, max_frames: int | None = None) -> np.ndarray:
  """uint8[T, S, S, 3] (S = image_size) of an `image`, `video` or `frames` sample."""
  if sample.kind == "image":
    img = image_lib.load_image(sample.path)
    return image_lib.image_to_uint8(img, size=image_size, aspect=image_aspect)[None]
  if sample.kind == "frames":
    if sample.frames.shape[1:] != (image_size, image_size, 3):
      raise SampleError("bad_frames", "frames", f"stored frames {sample.frames.shape[1:]}, expected "
                        f"{(image_size, image_size, 3)}", sample.path)
    return sample.frames
  if sample.kind != "video":
    raise ValueError(f"decode_pixels: media kind {sample.kind!r} has no pixels")
  sources_lib.refuse_pickle(sample)
  from llamavid_jax.data import video as video_lib   # PyAV only where videos are decoded

  frames, _ = video_lib.load_video(sample.path, fps=fps, max_frames=max_frames)  # raises VideoError
  if len(frames) == 0:
    raise SampleError("empty_video", "video", "no frames decoded", sample.path)
  return image_lib.frames_to_uint8(frames, size=image_size)


def decode_features(sample: sources_lib.RawSample, *, feature_shape: tuple[int, int],
                    max_frames: int | None = None) -> tuple[np.ndarray, str | None]:
  """float32[T, N+1, C] features of a `features` sample (T capped at `max_frames`) and
  the stored Q-Former prompt, if any."""
  if sample.features is not None:
    feats, prompt = sample.features, sample.prompt
  else:
    feats, prompt = sources_lib.load_features(sample.path)
  if feats.ndim != 3 or feats.shape[1:] != tuple(feature_shape) or not len(feats):
    raise SampleError("bad_features", "video", f"shape {feats.shape}, expected [T>0, {feature_shape[0]}, "
                      f"{feature_shape[1]}]", sample.path)
  if max_frames and len(feats) > max_frames:
    feats = feats[frames_lib.uniform_cap(len(feats), max_frames)]
  return feats.astype(np.float32), prompt


def decode_movie(sample: sources_lib.RawSample, spec: InputSpec, *,
                 max_frames: int | None = None) -> tuple[np.ndarray, str]:
  """A movie feature file (movie mode) -> ([T, N, C] features without CLS, in their stored
  dtype, and its `inputs`), as the release's `feats[:, 1:]`. A movie is never resampled
  (each frame has its own placeholder among the subtitles): more than `max_frames`
  frames is `too_long`."""
  movie = sources_lib.load_movie(movie_path(sample))
  if movie.inputs is None:
    raise SampleError("missing_inputs", "video", sources_lib.MISSING_INPUTS, sample.path)
  n, c = spec.feature_shape
  if movie.feats.shape[1:] != (n + 1, c):
    raise SampleError("bad_features", "video", f"shape {movie.feats.shape}, expected [T>0, {n + 1}, {c}] "
                      "(CLS first)", sample.path)
  check_movie_length(len(movie.feats), max_frames, sample.path)
  return movie.feats[:, 1:], movie.inputs


def movie_path(sample: sources_lib.RawSample) -> str:
  """The movie feature file of a sample in movie mode; raises `SampleError`:
  `not_a_movie` (an image, a video to decode, features without a file) or
  `pickle_features` (the release's `.pkl`: convert it first)."""
  if sample.kind != "features" or sample.features is not None or not sample.path:
    what = "features without a file (TFDS)" if sample.kind == "features" else f"{sample.kind} media"
    raise SampleError("not_a_movie", "video", f"video_mode 'movie' reads movie feature files, not {what}",
                      sample.path)
  sources_lib.refuse_pickle(sample)
  return sample.path


def check_movie_length(num_frames: int, max_frames: int | None, path: str | None) -> None:
  """Raises `SampleError` (`too_long`) for a movie of more than `max_frames` frames."""
  if max_frames and num_frames > max_frames:
    raise SampleError("too_long", "video", f"movie of {num_frames} frames > max_frames {max_frames} (a movie is "
                      "not resampled: every frame has its placeholder among the subtitles)", path)


def decode(sample: sources_lib.RawSample, spec: InputSpec, *, image_aspect: str = "pad",
           fps: float | None = 1.0, max_frames: int | None = None) -> tuple[np.ndarray, str | None]:
  """float32[T, S, S, 3] CLIP-normalized frames or float32[T, N+1, C] features of a
  sample with media, and the stored Q-Former prompt (None but for stored features)."""
  if sample.kind == "features":
    return decode_features(sample, feature_shape=spec.feature_shape, max_frames=max_frames)
  pixels = decode_pixels(sample, image_size=spec.image_size, image_aspect=image_aspect, fps=fps,
                         max_frames=max_frames)
  return image_lib.normalize(pixels), None
