"""The release's frame choice, as indices: pure, no decoding, no I/O.

Frame indices count frames in presentation order (the release, with decord); at `fps`
frames per second the step is round(avg_fps / fps) and the indices are
range(0, num_frames, step) (at fps=1: every round(avg_fps)-th frame). `fps=None` keeps
every frame (so does 0). A `max_frames` cap resamples the chosen indices uniformly (np.linspace
over them, rounded to the nearest); feature files get the same cap over their steps.

Planning counts frames with `frame_count` (from container metadata) and decoding picks
them with `frame_indices`: the count is the length of the indices, so the two agree.
"""

from __future__ import annotations

import numpy as np


def uniform_cap(n: int, max_frames: int | None) -> list[int]:
  """Positions kept of n by the uniform cap: all when n <= max_frames (or no cap), else
  np.linspace(0, n - 1, max_frames).round()."""
  if max_frames and n > max_frames:
    return np.linspace(0, n - 1, max_frames).round().astype(int).tolist()
  return list(range(n))


def frame_indices(num_frames: int, avg_fps: float, fps: float | None, max_frames: int | None) -> list[int]:
  """The release's frame choice (every round(avg_fps / fps)-th frame), then the uniform cap."""
  step = max(1, int(round(avg_fps / fps))) if fps else 1   # fps None (or 0): every frame
  idx = range(0, num_frames, step)
  return [idx[i] for i in uniform_cap(len(idx), max_frames)]


def frame_count(num_frames: int, avg_fps: float, fps: float | None, max_frames: int | None) -> int:
  """How many frames `frame_indices` keeps (planning's count from container metadata)."""
  return len(frame_indices(num_frames, avg_fps, fps, max_frames))
