"""Image preprocessing equal to the release's CLIP processor, in numpy/PIL.

The release uses transformers' `CLIPImageProcessor` configured by
`llamavid/processor/clip-patch14-224/preprocessor_config.json`: resize the shortest
edge to 224 (PIL bicubic on uint8), center crop 224, scale by 1/255 (float64, then
float32), normalize with the OpenAI CLIP mean/std (float32). The 336 variant only
changes both sizes to 336. Training images are first converted with PIL
`.convert("RGB")` (alpha dropped, palettes expanded) and, with aspect `pad`, pasted
centred on a square of the mean colour `tuple(int(m * 255) for m in MEAN)`.
Video frames are not padded.

The resize + crop result is uint8 (`resize_center_crop`); `normalize` maps it to
float32. The TFDS builder stores that uint8 crop, so reading it back and
normalizing gives exactly the same floats.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from llamavid_jax.data import SampleError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)

Aspect = Literal["pad", "crop"]


def to_rgb(img: Image.Image) -> Image.Image:
  """`img` as 8-bit RGB. 16-bit grayscale (PIL modes `I;16*`, and `I` as PNG gives it) is
  scaled to 8 bits (value / 257, rounded), not clipped at 255 as PIL's `convert` does;
  a 32-bit float image (mode `F`) is taken as 0..1 if its values are, else as 0..255."""
  if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    a = np.asarray(img).astype(np.float64)
    if img.mode != "I" or img.format == "PNG" or a.max(initial=0) > 255:
      a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
  if img.mode == "F":
    a = np.nan_to_num(np.asarray(img, np.float64))
    a = a * 255.0 if a.max(initial=0) <= 1.0 else a
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
  return img.convert("RGB")


def load_image(path: str) -> Image.Image:
  """Opens and fully decodes an image as RGB (`to_rgb`: 16-bit scaled to 8); raises
  `SampleError` (field `image`)."""
  try:
    with Image.open(path) as img:
      img.load()
      return to_rgb(img)
  except FileNotFoundError:
    raise SampleError("missing_file", "image", "file not found", path) from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise SampleError("unreadable_image", "image", f"{type(e).__name__}: {e}", path) from None


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
  """Pastes `img` centred on a square canvas of colour `fill` (release `expand2square`)."""
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  out = Image.new(img.mode, (side, side), fill)
  out.paste(img, ((side - w) // 2, (side - h) // 2))
  return out


def resize_center_crop(img: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
  """Shortest edge -> `size` (bicubic), center crop `size`: uint8[size, size, 3]."""
  if isinstance(img, np.ndarray):
    if img.shape == (size, size, 3) and img.dtype == np.uint8:
      return img          # what PIL's resize does at the same size (a copy), without the round trip
    img = Image.fromarray(img)
  if img.mode != "RGB":
    img = img.convert("RGB")
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  arr = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return arr[top: top + size, left: left + size]


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8[..., 3] -> float32[..., 3]: `(x / 255 - MEAN) / STD` like transformers."""
  x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def image_to_uint8(img: Image.Image, *, size: int = 224, aspect: Aspect = "pad") -> np.ndarray:
  """An RGB(A/P/L) PIL image -> uint8[size, size, 3] before normalization."""
  img = img.convert("RGB")
  if aspect == "pad":
    img = expand_to_square(img)
  elif aspect != "crop":
    raise ValueError(f"image aspect must be 'pad' or 'crop', got {aspect!r}")
  return resize_center_crop(img, size)


def preprocess_image(img: Image.Image, *, size: int = 224, aspect: Aspect = "pad") -> np.ndarray:
  """An RGB(A/P/L) PIL image -> float32[size, size, 3], CLIP-normalized (NHWC)."""
  return normalize(image_to_uint8(img, size=size, aspect=aspect))


def frames_to_uint8(frames: np.ndarray, *, size: int = 224) -> np.ndarray:
  """uint8[T, H, W, 3] video frames -> uint8[T, size, size, 3] (no padding)."""
  out = np.empty((len(frames), size, size, 3), np.uint8)
  for t, frame in enumerate(frames):
    out[t] = resize_center_crop(frame, size)
  return out


def preprocess_frames(frames: np.ndarray, *, size: int = 224) -> np.ndarray:
  """uint8[T, H, W, 3] video frames -> float32[T, size, size, 3], CLIP-normalized."""
  return normalize(frames_to_uint8(frames, size=size))
