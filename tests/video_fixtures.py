"""Generated test clips whose frames carry their own index (8 bit blocks)."""

from fractions import Fraction

import av
import numpy as np


def counter_frame(i: int, size=(64, 48)) -> np.ndarray:
  """uint8[H, W, 3]: bit b of i is a white 8-pixel column block b."""
  arr = np.zeros((size[1], size[0], 3), np.uint8)
  for bit in range(8):
    if (i >> bit) & 1:
      arr[:, bit * 8:(bit + 1) * 8] = 255
  return arr


def read_counter(frame: np.ndarray) -> int:
  return sum(int(frame[:, b * 8 + 2:(b + 1) * 8 - 2].mean() > 128) << b for b in range(8))


def write_counter_clip(path: str, n: int, rate, *, gop: int = 12, pts=None, size=(64, 48),
                       codec: str = "libx264", bframes: int = 0) -> str:
  """A clip of n counter frames at `rate` fps (container from the path's suffix); `pts`
  (ms) makes it variable-rate."""
  with av.open(path, "w") as out:
    s = out.add_stream(codec, rate=rate)
    s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
    s.options = {"g": str(gop), "bf": str(bframes)}
    if codec == "libx264":
      s.options |= {"crf": "10", "preset": "ultrafast" if not bframes else "medium"}
    if pts is not None:
      s.codec_context.time_base = Fraction(1, 1000)
    for i in range(n):
      frame = av.VideoFrame.from_ndarray(counter_frame(i, size), format="rgb24")
      if pts is not None:
        frame.pts, frame.time_base = int(pts[i]), Fraction(1, 1000)
      for p in s.encode(frame):
        out.mux(p)
    for p in s.encode():
      out.mux(p)
  return path
