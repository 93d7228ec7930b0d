"""Where the context token looked: one PNG of a video's frames (or an image) with the
context token's attention over their patches, for one question.

  python -m eval.visualize --ckpt DIR (--video F | --image F) --question Q --out F.png
      [--frames 16] [--alpha 0.5] [--answer] [--max-new-tokens 64] [--dtype float32|bfloat16]

DIR as for `eval.chat` (a converted / inference directory or a train WORKDIR). The
picture has, top to bottom:
- a title: the question and, with `--answer`, the model's greedy answer, then the heat
  map's scale (the least and the largest weight among the drawn frames);
- up to `--frames` evenly spaced frames of those the model sees (the checkpoint's own
  sampling: the release's 1 fps, or what its training data used, `inference.Model`), each
  with the context token's Eq. 1 attention (mean over the Q-Former queries,
  `Model.context_attention`) drawn over its patches as a jet heat map (`eval/overlay.py`:
  blue the least weight, red the most, one scale for every drawn frame) and a caption:
  the frame's time in the video and its peak ratio;
- a strip: one bar per frame the model sees (drawn or not) of the PEAK RATIO, the
  frame's largest patch weight x N patches (`overlay.peak_ratio`: 1 when the attention is
  uniform, N when it is all on one patch). Each frame's weights sum to 1 over its patches,
  so the mass per frame says nothing; the peak says in which frames the token found
  something to look at. The drawn frames' bars are dark, the others light.

Arguments, the checkpoint's kind (a content-only model has no context token: refused
with a message, exit status 1) and the media file (it must open as a video / an image)
are checked before the parameters are loaded. `render` draws from arrays alone and
returns what it drew (`Picture`: panel boxes in pixels, captions, the strip's values).
Needs matplotlib (`pip install 'llamavid-jax[viz]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

import numpy as np

from eval import args as eval_args, chat, overlay
from llamavid_jax import cli
from llamavid_jax import inference

DPI = 100
MARGIN, GAP, CAPTION, LINE = 24, 12, 26, 22   # pixels
STRIP_H, STRIP_LEFT, STRIP_BOTTOM = 150, 64, 44
MIN_WIDTH = 800
DARK, LIGHT = "#c0392b", "#e6b0aa"


class NoContextToken(ValueError):
  """The checkpoint is content-only: there is no context attention to draw."""

  def __init__(self, ckpt: str):
    super().__init__(f"{ckpt}: a content-only model (use_context_token=False) has no context token, "
                     "so there is no context attention to draw")


@dataclasses.dataclass
class Picture:
  """What `render` drew. Boxes are (left, top, right, bottom) pixels of the PNG."""

  path: str
  size: tuple[int, int]           # (width, height)
  frames: list[int]               # the drawn frames' indices among the model's frames
  captions: list[str]
  panels: list[tuple[int, int, int, int]]
  strip: np.ndarray               # float32[T]: the statistic of every frame the model saw
  strip_box: tuple[int, int, int, int]
  title: list[str]                # the title's lines


def frame_statistic(attn: np.ndarray) -> np.ndarray:
  """float[T, N] context attention -> float32[T], the strip's statistic: each frame's peak
  ratio (largest patch weight x N)."""
  return overlay.peak_ratio(attn)


def _when(t: float | None) -> str:
  return "image" if t is None else f"{t:.1f} s"


def _width(text: str, renderer, font) -> float:
  return renderer.get_text_width_height_descent(text, font, ismath=False)[0]


def _wrap(text: str, renderer, font, max_px: float) -> list[str]:
  """Words -> lines no wider than max_px pixels in `font` (a longer word gets a line)."""
  lines: list[str] = []
  for word in text.split():
    if lines and _width(f"{lines[-1]} {word}", renderer, font) <= max_px:
      lines[-1] += f" {word}"
    else:
      lines.append(word)
  return lines or [""]


def render(frames: np.ndarray, attn: np.ndarray, shown: Sequence[int], times: Sequence[float | None], *,
           question: str, out: str, answer: str | None = None, alpha: float = 0.5) -> Picture:
  """uint8[K, S, S, 3] frames (the drawn ones), float32[T, N] attention over all T frames
  the model saw, int[K] the drawn frames' indices in [0, T), float[T] each frame's time
  in seconds (None for an image) -> `out` written as a PNG; -> Picture."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.font_manager import FontProperties

  attn = np.asarray(attn, np.float32)
  shown = [int(i) for i in shown]
  if len(frames) != len(shown) or not shown:
    raise ValueError(f"{len(frames)} frames for {len(shown)} shown indices (want as many, at least one)")
  if len(times) != len(attn) or max(shown) >= len(attn):
    raise ValueError(f"attention of {len(attn)} frames, {len(times)} times, shown up to frame {max(shown)}")
  drawn = attn[shown]
  pictures = overlay.overlay(frames, drawn, alpha=alpha)
  stat = frame_statistic(attn)
  captions = [f"{_when(times[i])} · peak {stat[i]:.1f}×" for i in shown]

  s = frames.shape[1]
  cols = min(len(shown), 4)
  rows = -(-len(shown) // cols)
  grid_w = cols * s + (cols - 1) * GAP
  width = max(grid_w + 2 * MARGIN, MIN_WIDTH)
  fig = Figure(dpi=DPI, facecolor="white")
  renderer = FigureCanvasAgg(fig).get_renderer()
  big = FontProperties(size=12)
  title = _wrap(f"Q: {question}", renderer, FontProperties(size=12, weight="bold"), width - 2 * MARGIN)
  bold = len(title)
  if answer is not None:
    title += _wrap(f"A (greedy): {answer or '(no text)'}", renderer, big, width - 2 * MARGIN)
  low, high = f"{drawn.min():.2e}", f"{drawn.max():.2e}"
  title.append(f"heat map of the patch weights, one scale for every drawn frame:  {low}  {' ' * 30}  {high}")
  title_h = MARGIN + LINE * len(title)
  grid_top = title_h + GAP
  strip_title = _wrap(f"Peak ratio per frame = its largest patch weight × N = {attn.shape[1]} (the weights sum "
                      "to 1; dashed, 1: uniform). Dark: the frames drawn above.", renderer, FontProperties(size=9),
                      width - MARGIN - STRIP_LEFT)
  strip_top = grid_top + rows * (s + CAPTION + GAP) + 16 * len(strip_title) + 6
  height = strip_top + STRIP_H + STRIP_BOTTOM
  fig.set_size_inches(width / DPI, height / DPI)

  def axes(box):   # (left, top, right, bottom) pixels -> axes
    l, t, r, b = box
    return fig.add_axes((l / width, 1 - b / height, (r - l) / width, (b - t) / height))

  for n, line in enumerate(title[:-1]):
    fig.text(MARGIN / width, 1 - (MARGIN + LINE * n) / height, line, ha="left", va="top", fontsize=12,
             fontweight="bold" if n < bold else "normal")
  # the last line: "... low [jet scale] high (...)", the scale drawn where the blanks are
  small = FontProperties(size=9)
  y = MARGIN + LINE * (len(title) - 1)
  head = title[-1][:title[-1].index(low) + len(low)] + "  "
  x0 = MARGIN + _width(head, renderer, small)
  x1 = MARGIN + _width(title[-1][:title[-1].index(high)], renderer, small) - 4
  fig.text(MARGIN / width, 1 - y / height, head, ha="left", va="top", fontproperties=small, color="#444444")
  fig.text((x1 + 4) / width, 1 - y / height, title[-1][title[-1].index(high):], ha="left", va="top",
           fontproperties=small, color="#444444")
  scale = axes((int(x0), y + 2, int(x1), y + 11))
  scale.imshow(overlay.jet(np.linspace(0, 1, 256))[None], aspect="auto")
  scale.set_axis_off()
  left0 = (width - grid_w) // 2
  panels = []
  for k, (pic, cap) in enumerate(zip(pictures, captions)):
    r, c = divmod(k, cols)
    l, t = left0 + c * (s + GAP), grid_top + r * (s + CAPTION + GAP)
    box = (l, t, l + s, t + s)
    ax = axes(box)
    ax.imshow(pic, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    fig.text((l + s / 2) / width, 1 - (t + s + 4) / height, cap, ha="center", va="top", fontsize=10)
    panels.append(box)

  strip_box = (STRIP_LEFT, strip_top, width - MARGIN, strip_top + STRIP_H)
  ax = axes(strip_box)
  t_axis = np.asarray([i if t is None else t for i, t in enumerate(times)], np.float64)
  step = float(np.median(np.diff(t_axis))) if len(t_axis) > 1 else 1.0
  colours = [LIGHT] * len(stat)
  for i in shown:
    colours[i] = DARK
  ax.bar(t_axis, stat, width=0.8 * (step or 1.0), color=colours)
  ax.axhline(1.0, color="#555555", linestyle="--", linewidth=0.8)
  ax.set_ylim(0, max(float(stat.max()) * 1.15, 1.2))
  pad = 0.6 * (step or 1.0) if len(t_axis) > 1 else 3.0   # one bar (an image): a narrow one
  ax.set_xlim(t_axis[0] - pad, t_axis[-1] + pad)
  ax.set_xlabel("image" if times[0] is None else "time in the video (s)", fontsize=9)
  ax.set_ylabel("peak ratio", fontsize=9)
  ax.tick_params(labelsize=8)
  if times[0] is None:
    ax.set_xticks([])
  ax.set_title("\n".join(strip_title), fontsize=9, loc="left")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=DPI, format="png", facecolor="white")
  return Picture(out, (width, height), shown, captions, panels, stat, strip_box, title)


def read_frames(m: inference.Model, kind: str, path: str, limit: int):
  """-> (Media: the model's input, int[K] the drawn frames' indices, uint8[K, S, S, 3]
  them for display, float[T] every model frame's time in seconds, None for an image):
  the same frames the model sees (its sampling), at least DISPLAY_SIZE large. Raises
  inference.MediaError."""
  from llamavid_jax.data import SampleError
  from llamavid_jax.data.video import VideoError
  media = m.media(**{kind: path})
  try:
    idx, shown, times = overlay.display_frames(image_size=m.cfg.vision.image_size, aspect=m.image_aspect,
                                               fps=m.video_fps, max_frames=m.sample_cap, **{kind: path})
  except (VideoError, SampleError, OSError) as e:
    raise inference.MediaError(path, str(e)) from None
  if len(shown) != media.num_frames:
    raise inference.MediaError(path, f"decoded {len(shown)} frames for display, the model saw {media.num_frames}")
  keep = overlay.shown_frames(len(shown), limit)
  return media, keep, shown[keep], times


def visualize(m: inference.Model, *, question: str, out: str, video: str | None = None, image: str | None = None,
              frames: int = 16, alpha: float = 0.5, answer: bool = False, max_new_tokens: int = 64,
              ckpt: str = "the checkpoint") -> Picture:
  """One question about a video or an image -> the picture at `out` (see the module's
  docstring). Raises NoContextToken (naming `ckpt`) for a content-only model,
  inference.MediaError."""
  if not m.cfg.use_context_token:
    raise NoContextToken(ckpt)
  kind, path = ("video", video) if video else ("image", image)
  media, idx, shown, times = read_frames(m, kind, path, frames)
  req = m.request(question, media)
  attn = m.context_attention(req)
  if attn is None:
    raise NoContextToken(ckpt)
  text = m.generate([req], max_new_tokens=max_new_tokens, temperature=0.0)[0].text if answer else None
  return render(shown, attn, idx, times, question=question, out=out, answer=text, alpha=alpha)


# --- the command line ----------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m eval.visualize", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  eval_args.add_model_flags(p)   # --ckpt --dtype --mesh --quant
  media = p.add_mutually_exclusive_group(required=True)
  media.add_argument("--video", help="a video file (the checkpoint's frame sampling: 1 fps for a release model)")
  media.add_argument("--image", help="an image file")
  p.add_argument("--question", required=True, help="the question (also the Q-Former instruction)")
  p.add_argument("--out", required=True, help="the PNG to write")
  p.add_argument("--frames", type=int, default=16, help="draw up to this many evenly spaced frames")
  p.add_argument("--alpha", type=float, default=0.5, help="heat map opacity in [0, 1]")
  p.add_argument("--answer", action="store_true", help="also generate the greedy answer and put it in the title")
  p.add_argument("--max-new-tokens", type=int, default=64, help="the answer's token budget (with --answer)")
  return p


def checkpoint_config(ckpt: str):
  """The model config of a converted / inference directory or a train WORKDIR, read
  without its parameters; None when DIR is neither (`inference.load` says why)."""
  from llamavid_jax.checkpoint import orbax_io
  from llamavid_jax.models import config as C
  cfg_file = os.path.join(ckpt, orbax_io.MODEL_CONFIG)
  if os.path.exists(cfg_file):
    try:
      return orbax_io.load_config(ckpt)
    except Exception as e:   # noqa: BLE001  (named as inference.load names it)
      raise inference.CheckpointError(cfg_file, f"not a model config: {type(e).__name__}: {e}") from None
  if orbax_io.is_train_workdir(ckpt):
    return C.from_dict(orbax_io.read_train_config(ckpt)["model"])
  return None


def check_media(kind: str, path: str) -> None:
  """Opens the file as the model will (a video's first frame, an image whole); raises
  inference.MediaError naming it."""
  from llamavid_jax.data import SampleError
  try:
    if kind == "image":
      from llamavid_jax.data.image import load_image
      load_image(path)
    else:
      from llamavid_jax.data.video import load_video
      load_video(path, fps=None, max_frames=1)
  except SampleError as e:   # VideoError is one
    raise inference.MediaError(path, str(e)) from None


def main(argv=None) -> Picture:
  p = parser()
  a = p.parse_args(argv)
  eval_args.check_model_flags(p, a)
  if not a.question.strip():
    p.error("--question is empty")
  if a.frames < 1:
    p.error(f"--frames must be >= 1, got {a.frames}")
  if not 0 <= a.alpha <= 1:
    p.error(f"--alpha must be in [0, 1], got {a.alpha}")
  if a.max_new_tokens < 1:
    p.error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
  if not a.out.lower().endswith(".png"):
    p.error(f"--out {a.out}: the picture is a PNG (want a .png name)")
  if os.path.isdir(a.out):
    p.error(f"--out {a.out}: is a directory")
  chat.check_ckpt(p, a.ckpt)
  kind = "video" if a.video else "image"
  path = getattr(a, kind)
  if not os.path.isfile(path):
    p.error(f"--{kind} {path}: no such file")
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    sys.exit("eval.visualize needs matplotlib: pip install 'llamavid-jax[viz]'")
  cfg = checkpoint_config(a.ckpt)
  if cfg is not None and not cfg.use_context_token:
    sys.exit(f"error: {NoContextToken(a.ckpt)}")
  try:
    check_media(kind, path)
  except inference.MediaError as e:
    sys.exit(f"error: --{kind} {e}")
  m = eval_args.load(a)
  try:
    pic = visualize(m, question=a.question.strip(), out=a.out, frames=a.frames, alpha=a.alpha, answer=a.answer,
                    max_new_tokens=a.max_new_tokens, ckpt=a.ckpt, **{kind: path})
  except NoContextToken as e:
    sys.exit(f"error: {e}")
  except inference.MediaError as e:
    sys.exit(f"error: --{kind} {e}")
  print(f"eval.visualize: wrote {pic.path} ({pic.size[0]}x{pic.size[1]}, {len(pic.frames)} of "
        f"{len(pic.strip)} frames drawn)")
  return pic


if __name__ == "__main__":
  cli.run(main)   # a known error: `error: <one line>`, exit 2 / 1 (--debug: the traceback)
