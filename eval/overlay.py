"""The context token's attention drawn over the frames it looked at (numpy and PIL only:
the web demo and `eval.visualize` share it).

  idx, frames, times = display_frames(image_size=S, video=path, limit=16)   # up to 16 of the model's frames
  attn = model.context_attention(request)       # float32[T, N], N = (image_size / patch_size)^2
  pictures = overlay(frames, attn[idx])         # uint8[S', S', 3] each: frame + heat map

`overlay` upsamples each frame's [g, g] patch map (row-major, as the ViT's patches) to
the frame size (bilinear), maps it through a jet colormap (blue: the least weight, red:
the most) and alpha-blends it over the frame. One scale serves every frame passed in
(the smallest to the largest weight among them), so colours compare across frames.
Each frame's weights are a softmax over its patches (Eq. 1) and sum to 1 per frame:
the colours show where, relative to the other patches; `peak_ratio` (largest weight
x N: 1 for uniform, N for all on one patch) says how peaked a frame's attention is.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

DISPLAY_SIZE = 224   # frames are drawn at least this large (the same crop as the model's)


def jet(x: np.ndarray) -> np.ndarray:
  """float[...] in [0, 1] -> float32[..., 3] RGB in [0, 1] (the classic piecewise-linear jet)."""
  x = np.clip(np.asarray(x, np.float32), 0, 1)[..., None]
  centres = np.asarray([0.75, 0.5, 0.25], np.float32)   # r, g, b
  return np.clip(1.5 - np.abs(4 * x - 4 * centres), 0, 1)


def patch_grid(num_patches: int) -> int:
  g = math.isqrt(num_patches)
  if g * g != num_patches:
    raise ValueError(f"{num_patches} patches are not a square grid")
  return g


def overlay(frames: np.ndarray | Sequence[np.ndarray], attn: np.ndarray, *, alpha: float = 0.5,
            vmin: float | None = None, vmax: float | None = None) -> list[np.ndarray]:
  """uint8[T, H, W, 3] frames + float[T, N] attention over each frame's g x g patches ->
  T uint8[H, W, 3] pictures: the frame blended (1 - alpha) with the jet colours of its
  upsampled attention, vmin..vmax mapped to 0..1 (default: the least and the largest
  weight in `attn`; all one colour, 0, when they are equal)."""
  attn = np.asarray(attn, np.float32)
  if attn.ndim != 2 or len(attn) != len(frames):
    raise ValueError(f"attention {list(attn.shape)} does not match {len(frames)} frames (want [T, N])")
  g = patch_grid(attn.shape[1])
  lo = float(attn.min()) if vmin is None else float(vmin)
  hi = float(attn.max()) if vmax is None else float(vmax)
  scale = 1.0 / (hi - lo) if hi > lo else 0.0
  out = []
  for frame, a in zip(frames, attn):
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
      raise ValueError(f"frames must be uint8[H, W, 3], got {frame.dtype}{list(frame.shape)}")
    h, w = frame.shape[:2]
    grid = ((a - lo) * scale).reshape(g, g).astype(np.float32)
    heat = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR))
    mixed = (1 - alpha) * frame.astype(np.float32) + alpha * 255 * jet(heat)
    out.append(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
  return out


def peak_ratio(attn: np.ndarray) -> np.ndarray:
  """float[T, N] -> float32[T]: each frame's largest weight x N (1: uniform; N: one patch)."""
  attn = np.asarray(attn, np.float32)
  return attn.max(1) * attn.shape[1]


def shown_frames(num_frames: int, limit: int = 16) -> np.ndarray:
  """Up to `limit` evenly spaced indices in [0, num_frames), first and last included."""
  if num_frames <= 0:
    return np.zeros((0,), np.int64)
  return np.unique(np.linspace(0, num_frames - 1, min(num_frames, limit)).round().astype(np.int64))


def display_frames(*, image_size: int, aspect: str = "pad", video: str | None = None,
                   image: str | None = None, limit: int | None = None, size: int | None = None,
                   fps: float | None = 1.0, max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray, list]:
  """The frames the model sees, before CLIP normalisation: a video's sampled as the
  model samples (`fps`, `max_frames`: `inference.Model.video_fps` / `sample_cap`; the
  release's 1 fps by default; center crop) or an image (padded to a square when
  `aspect` is pad) -> (int[K] their indices among the model's frames, `shown_frames`
  when `limit` is set; uint8[K, S, S, 3]; the K frames' times in seconds, [None] for an
  image) with S = max(image_size, DISPLAY_SIZE) (the same crop, drawn larger). Raises
  like the model's `media` (VideoError / SampleError) for unreadable files."""
  from llamavid_jax.data.image import frames_to_uint8, image_to_uint8, load_image
  size = size or max(image_size, DISPLAY_SIZE)
  if image:
    return np.zeros((1,), np.int64), image_to_uint8(load_image(image), size=size, aspect=aspect)[None], [None]
  from llamavid_jax.data.video import load_video
  frames, info = load_video(video, fps=fps, max_frames=max_frames)
  idx = np.arange(len(frames)) if limit is None else shown_frames(len(frames), limit)
  times = [float(info["timestamps"][i]) for i in idx]
  return idx, frames_to_uint8(frames[idx], size=size), times
