"""Video decoding with PyAV: the release's frame choice, by seeking when it pays.

Frame choice: `frames.frame_indices` (the release's every round(avg_fps / fps)-th
frame, then a uniform `max_frames` cap); planning counts frames with the same rule.

Decoding: the packets are demuxed once (no decoding) to learn the frame count, every
frame's pts and the keyframes. The wanted frames are then decoded either in order
from the start, counting the decoder's output (right whatever the container's time
stamps say), or, when they are sparse, by seeking to the keyframe before each one and
matching pts. Seeking is never used for AVI (no presentation stamps), and falls back
to decoding in order when the stamps prove untrustworthy. Both paths return the same
frames (tested on mp4, mkv, webm, mov and AVI, with and without B-frames).

Errors: `VideoError` (a `SampleError`, field `video`) with the same reason tags as
`sources.probe_video`: `missing_file`, `no_video_stream`, `unreadable_video`,
`empty_video` (no frames, or no frame rate).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from typing import Callable

import av
import numpy as np

from llamavid_jax.data import SampleError
from llamavid_jax.data.frames import frame_indices


class VideoError(SampleError):
  """An unusable video file.

  Attributes (those of `SampleError`, field `video`):
    reason: `missing_file`, `no_video_stream`, `unreadable_video` or `empty_video`.
    detail: what went wrong, for people.
  """

  def __init__(self, path: str, reason: str, detail: str):
    super().__init__(reason, "video", detail, path)


@dataclasses.dataclass(frozen=True)
class VideoIndex:
  """What demuxing tells without decoding: every frame's pts (presentation order) and
  the keyframes' pts."""
  pts: list[int]
  keyframes: list[int]
  avg_fps: float
  time_base: float


def _open(path: str):
  if not os.path.exists(path):
    raise VideoError(path, "missing_file", "file not found")
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise VideoError(path, "unreadable_video", f"cannot open: {e}") from None
  if not container.streams.video:
    container.close()
    raise VideoError(path, "no_video_stream", "no video stream")
  return container


def index_video(container, path: str = "") -> VideoIndex:
  stream = container.streams.video[0]
  pts, keys = [], []
  try:
    for packet in container.demux(stream):
      if packet.pts is None:       # the demuxer's final flush packet
        continue
      pts.append(packet.pts)
      if packet.is_keyframe:
        keys.append(packet.pts)
  except av.error.FFmpegError as e:
    raise VideoError(path, "unreadable_video", f"unreadable: {e}") from None
  if not pts:
    raise VideoError(path, "empty_video", "no frames")
  rate = stream.average_rate or stream.guessed_rate
  return VideoIndex(sorted(pts), sorted(keys), float(rate) if rate else 0.0, float(stream.time_base))


def load_video(path: str, *, fps: float | None = 1.0, max_frames: int | None = None,
               seek: bool | None = None,
               transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
  """-> (uint8[T, H, W, 3] RGB frames, info). `seek=None` chooses by the spacing of the
  wanted frames against the keyframe spacing. `transform` maps each wanted frame as soon
  as it is decoded (e.g. to its 224 crop: a long movie is never held at full size); the
  result stacks its outputs. Raises VideoError naming the file."""
  container = _open(path)
  try:
    vi = index_video(container, path)
    if vi.avg_fps <= 0:
      raise VideoError(path, "empty_video", "unknown frame rate")
    idx = frame_indices(len(vi.pts), vi.avg_fps, fps, max_frames)
    gop = len(vi.pts) / max(len(vi.keyframes), 1)
    gap = len(vi.pts) / max(len(idx), 1)
    # AVI stores no presentation times (PyAV reports decode-order stamps), so a seek
    # cannot be aimed at a frame there: always decode from the start.
    use_seek = (gap > 2 * gop) if seek is None else seek
    use_seek = use_seek and "avi" not in container.format.name.split(",")
    got = _decode_seeking(container, vi, idx, transform) if use_seek else None
  finally:
    container.close()
  fallback = use_seek and got is None
  frames, decoded = got if got is not None else _decode_in_order(path, idx, transform)
  info = dict(avg_fps=vi.avg_fps, num_frames=len(vi.pts), indices=idx,
              timestamps=[(vi.pts[i] - vi.pts[0]) * vi.time_base for i in idx], decoded=decoded,
              seek=use_seek and not fallback, seek_fallback=fallback)
  return np.stack(frames), info


def _rgb(frame, transform):
  arr = frame.to_ndarray(format="rgb24")
  return arr if transform is None else transform(arr)


def _decode_in_order(path: str, idx: list[int], transform=None):
  """The frames at presentation positions `idx`: decode from the start and count the
  decoder's output (decoders emit presentation order whatever the container's stamps)."""
  container = _open(path)
  stream = container.streams.video[0]
  want, out, decoded = set(idx), {}, 0
  try:
    for frame in container.decode(stream):
      if decoded in want:
        out[decoded] = _rgb(frame, transform)
      decoded += 1
      if len(out) == len(want):
        break
  except av.error.FFmpegError as e:
    raise VideoError(path, "unreadable_video", f"decoding failed: {e}") from None
  finally:
    container.close()
  return _in_order(out, idx, path), decoded


def _decode_seeking(container, vi: VideoIndex, idx: list[int], transform=None):
  """The frames at presentation positions `idx`, found by pts after seeking to the
  keyframe before each one (when the decoder is not already on its way there).
  None when the stream's stamps cannot be trusted (a wanted pts never comes out, or
  stamps go backwards): the caller then decodes in order."""
  stream = container.streams.video[0]
  wanted = [vi.pts[i] for i in idx]
  out, decoded, frames, last = {}, 0, None, None
  try:
    for target in wanted:
      if target in out:
        continue
      # seek unless the decoder is already before `target` with no keyframe in between
      k = bisect.bisect_right(vi.keyframes, target) - 1
      key = vi.keyframes[max(k, 0)]
      if frames is None or last is None or last >= target or key > last:
        container.seek(key, stream=stream, backward=True, any_frame=False)
        frames, last = container.decode(stream), None
      for frame in frames:
        decoded += 1
        if frame.pts is None or (last is not None and frame.pts <= last):
          return None
        last = frame.pts
        if frame.pts == target:
          out[target] = _rgb(frame, transform)
          break
        if frame.pts > target:
          return None
  except av.error.FFmpegError:
    return None
  if len(out) < len(set(wanted)):
    return None
  return [out[p] for p in wanted], decoded


def _in_order(out: dict, wanted: list[int], path: str) -> list[np.ndarray]:
  missing = [p for p in wanted if p not in out]
  if missing:
    raise VideoError(path, "unreadable_video", f"{len(missing)} of {len(wanted)} wanted frames could "
                     f"not be decoded (first: frame {missing[0]})")
  return [out[p] for p in wanted]
