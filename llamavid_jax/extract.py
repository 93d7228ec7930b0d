"""ViT features of movies, as the release's `scripts/extra_tool/extract_video_features_subtitles.py`
makes them (serving: it loads a checkpoint; the files it writes are `data.features`'):

  python -m llamavid_jax.extract --ckpt DIR (--video F | --videos LIST.txt | --video-dir DIR) --out DIR
      [--subtitles F.srt|F.vtt | --subtitle-dir DIR] [--dtype float16|bfloat16]
      [--compute-dtype float32|bfloat16] [--batch-size 64]

Per video:
- frames at 1 fps by the release's rule (every round(avg_fps)-th frame, `data.frames`), each
  cropped to the checkpoint's `image_size` as soon as it is decoded (CLIP resize + centre crop,
  no padding: `data.image`), so a two-hour movie is held as 224 crops, never at full size;
- ViT features [T, N+1, C] (CLS first: the release's `vision_tower(frames)`), `--batch-size`
  frames a step, data-parallel over every device: a 1-D mesh `("data",)` of all devices, the
  frames of a step split over it by a NamedSharding, the ViT's parameters replicated. Every
  step has the same shape (the batch size rounded up to a multiple of the device count; the
  last step zero-padded), so one compile serves all steps and all videos;
- stored as float16 (the release's `.numpy().astype("float16")`, the default) or bfloat16:
  the ViT's output (float32, or bfloat16 with `--compute-dtype bfloat16`: parameters and
  compute) is rounded once, on the host;
- `inputs`: one `<image>` per frame with the subtitles placed by the release's rule
  (`data.subtitles`), or "<image>" * T without subtitles;
- written with `features.write_safetensors` to OUT/<video stem>.safetensors (the data go to
  a temporary file renamed into place when complete: a partial write never looks finished).

A folder resumes: outputs that exist are skipped (and leftover temporary files of killed
runs removed when their video is redone). Arguments and files are checked, and every
subtitle file read, before the model is loaded; a video that fails (unreadable, no frames,
a bad or missing subtitle file, a failed write) is named with the reason and counted, and
the others go on. The last line is `N videos: extracted a, skipped b (exists), failed c`;
the exit status is 1 if any failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import glob
import math
import os
import sys
from typing import Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from llamavid_jax import cli
from llamavid_jax import inference
from llamavid_jax.data import SampleError
from llamavid_jax.data import features as ft
from llamavid_jax.data import subtitles as subs
from llamavid_jax.data.image import normalize, resize_center_crop
from llamavid_jax.data.video import load_video
from llamavid_jax.models import LlamaVid

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")   # = inference.VIDEO_SUFFIXES less .gif


class UsageError(ValueError):
  """Arguments or files that make the whole run impossible (exit status 2)."""


@dataclasses.dataclass
class Job:
  """One video: where its features go, its subtitles (the file and, once read, the cues),
  and what happened (`status`: todo, skipped, failed, extracted; `error` when failed)."""
  video: str
  out: str
  subtitles: str | None = None
  cues: list | None = None
  status: str = "todo"
  error: str = ""


# ---- planning (no model) ---------------------------------------------------------------


def list_videos(video: str | None = None, videos: str | None = None, video_dir: str | None = None) -> list[str]:
  """The videos of exactly one of: one file, a list file (one path a line; blank lines and
  `#` comments skipped; relative paths from the working directory), a directory (its files
  with a video suffix, sorted, not recursive). Raises UsageError."""
  if sum(x is not None for x in (video, videos, video_dir)) != 1:
    raise UsageError("give exactly one of --video, --videos, --video-dir")
  if video is not None:
    if not os.path.isfile(video):
      raise UsageError(f"--video {video}: no such file")
    return [video]
  if videos is not None:
    if not os.path.isfile(videos):
      raise UsageError(f"--videos {videos}: no such file")
    with open(videos, encoding="utf-8") as f:
      out = [s for line in f if (s := line.strip()) and not s.startswith("#")]
    if not out:
      raise UsageError(f"--videos {videos}: no video paths in it")
    return out
  if not os.path.isdir(video_dir):
    raise UsageError(f"--video-dir {video_dir}: no such directory")
  out = sorted(os.path.join(video_dir, n) for n in os.listdir(video_dir)
               if n.lower().endswith(VIDEO_SUFFIXES) and os.path.isfile(os.path.join(video_dir, n)))
  if not out:
    raise UsageError(f"--video-dir {video_dir}: no video files ({', '.join(VIDEO_SUFFIXES)})")
  return out


def stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def subtitle_file(video: str, subtitle_dir: str) -> str:
  """SUBTITLE_DIR/NAME.srt or NAME.vtt for the video NAME.*; raises SubtitleError when
  there is neither (or both)."""
  found = [p for ext in subs.SUFFIXES
           if os.path.isfile(p := os.path.join(subtitle_dir, stem(video) + ext))]
  if len(found) != 1:
    tried = " or ".join(os.path.join(subtitle_dir, stem(video) + ext) for ext in subs.SUFFIXES)
    raise subs.SubtitleError("both subtitle files exist: keep one" if found else f"no subtitle file ({tried})",
                             " and ".join(found) if found else video, reason="missing_subtitles")
  return found[0]


def plan(videos: Sequence[str], out_dir: str, *, subtitles: str | None = None,
         subtitle_dir: str | None = None, subtitle_encoding: str | None = None) -> list[Job]:
  """One Job per video, already `skipped` (output exists) or `failed` (missing video,
  missing or unreadable subtitles) where that is known without the model. Raises
  UsageError for options that cannot go together, two videos with one output name, or a
  missing subtitle file / directory."""
  if subtitles is not None and subtitle_dir is not None:
    raise UsageError("give --subtitles or --subtitle-dir, not both")
  if subtitles is not None:
    if len(videos) != 1:
      raise UsageError("--subtitles is for one --video; use --subtitle-dir for several")
    if not os.path.isfile(subtitles):
      raise UsageError(f"--subtitles {subtitles}: no such file")
    if not subtitles.lower().endswith(subs.SUFFIXES):
      raise UsageError(f"--subtitles {subtitles}: expected a {' or '.join(subs.SUFFIXES)} file")
  if subtitle_dir is not None and not os.path.isdir(subtitle_dir):
    raise UsageError(f"--subtitle-dir {subtitle_dir}: no such directory")
  jobs, by_out = [], {}
  for v in videos:
    out = os.path.join(out_dir, stem(v) + ".safetensors")
    if out in by_out:
      raise UsageError(f"{by_out[out]} and {v} would both be written to {out}: rename one")
    by_out[out] = v
    job = Job(v, out, subtitles)
    jobs.append(job)
    if os.path.exists(out):
      job.status = "skipped"
      continue
    try:
      if not os.path.isfile(v):
        raise SampleError("missing_file", "video", "file not found", v)
      if subtitle_dir is not None:
        job.subtitles = subtitle_file(v, subtitle_dir)
      if job.subtitles is not None:
        job.cues = subs.read_subtitles(job.subtitles, subtitle_encoding)
    except (SampleError, ft.MovieError) as e:
      job.status, job.error = "failed", describe(e)
  return jobs


def describe(e: BaseException) -> str:
  """A failure for people: the file, the reason tag and the detail."""
  if isinstance(e, ft.MovieError):
    return f"{e.path}: {e.reason}: {e.detail}"
  if isinstance(e, SampleError):
    return str(e)
  return f"{type(e).__name__}: {e}"


def remove_stale_tmp(out: str) -> None:
  """Removes `out`.tmpPID files (`write_safetensors`'s) whose process is gone (a killed run)."""
  for tmp in glob.glob(glob.escape(out) + ".tmp*"):
    pid = tmp[len(out) + 4:]
    if not pid.isdigit():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      os.remove(tmp)
    except (PermissionError, OverflowError):   # alive (another user's) / not a pid: left alone
      pass


# ---- the ViT ---------------------------------------------------------------------------


def _vit(model, params, frames):
  """float32[B, S, S, 3] -> [B, N+1, C]: the model's ViT (`LlamaVid.vit`, CLS first)."""
  return model.apply({"params": params}, frames, method=lambda m, x: m.vit(x))


# compiled once per model and input shape / sharding (the frames' rows over the mesh, the
# parameters replicated: the output keeps the rows' sharding)
vit_step = jax.jit(_vit, static_argnums=0)


class Extractor:
  """The ViT of a loaded model (`inference.load`), compiled once for steps of `batch`
  frames split over all `devices` (module docstring)."""

  def __init__(self, model, batch_size: int = 64, devices=None):
    devices = list(devices if devices is not None else jax.devices())
    self.mesh = Mesh(np.asarray(devices), ("data",))
    self.batch = math.ceil(batch_size / len(devices)) * len(devices)
    self.size = model.cfg.vision.image_size
    self.model = LlamaVid(dataclasses.replace(model.cfg, dtype=model.dtype))
    self._rows = NamedSharding(self.mesh, P("data"))
    self.params = jax.device_put({"vit": model.params["vit"]}, NamedSharding(self.mesh, P()))

  def features(self, crops: np.ndarray, dtype=np.float16, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """uint8[T, S, S, 3] crops -> `dtype`[T, N+1, C] ViT features (float32 output rounded
    once). The next step is dispatched before the last one is fetched."""
    t = len(crops)
    if not t:
      raise ValueError("no frames")
    out, pending = None, None
    for lo in [*range(0, t, self.batch), None]:
      nxt = None
      if lo is not None:
        x = np.zeros((self.batch,) + crops.shape[1:], np.float32)
        x[:min(self.batch, t - lo)] = normalize(crops[lo: lo + self.batch])
        nxt = (lo, vit_step(self.model, self.params, jax.device_put(x, self._rows)))
      if pending is not None:
        plo, y = pending
        y = np.asarray(y)[:min(self.batch, t - plo)].astype(np.float32)
        if out is None:
          out = np.empty((t,) + y.shape[1:], dtype)
        out[plo: plo + len(y)] = y.astype(dtype)
        if progress:
          progress(len(y))
      pending = nxt
    return out


def extract_one(ex: Extractor, job: Job, dtype=np.float16, bar=None) -> ft.Movie:
  """A job's video -> its Movie (features + `inputs`), written to `job.out`."""
  def crop(frame):
    if bar is not None:
      bar.update(1)
    return resize_center_crop(frame, ex.size)

  crops, info = load_video(job.video, fps=1.0, transform=crop)
  if len(crops) == 0:
    raise SampleError("empty_video", "video", "no frames", job.video)
  times = [i / info["avg_fps"] for i in info["indices"]]   # the release's frame_time: index / avg fps
  inputs = subs.movie_inputs(job.cues, times) if job.cues is not None else ft.IMAGE_TOKEN * len(crops)
  if bar is not None:
    bar.reset(total=len(crops))
    bar.set_description(f"{stem(job.video)} ViT")
  feats = ex.features(crops, dtype, bar.update if bar is not None else None)
  movie = ft.Movie(feats, inputs)
  os.makedirs(os.path.dirname(job.out) or ".", exist_ok=True)
  remove_stale_tmp(job.out)
  ft.write_safetensors(job.out, movie)
  return movie


def run(jobs: list[Job], load_model: Callable[[], object], *, dtype: str = "float16", batch_size: int = 64,
        log=None) -> dict[str, int]:
  """Extracts every `todo` job (the model is loaded only if there is one); a failure is
  logged and counted, the others go on. Returns {"extracted", "skipped", "failed"}."""
  log = log or tqdm.write
  np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
  for j in jobs:
    if j.status == "skipped":
      log(f"skipped {j.video} ({j.out} exists)")
    elif j.status == "failed":
      log(f"FAILED {j.video}: {j.error}")
  todo = [j for j in jobs if j.status == "todo"]
  if todo:
    ex = Extractor(load_model(), batch_size)
    with tqdm(total=len(todo), desc="videos", unit="video") as videos:
      for j in todo:
        with tqdm(desc=f"{stem(j.video)} decode", unit="frame", leave=False) as bar:
          try:
            movie = extract_one(ex, j, np_dtype, bar)
          except (SampleError, ft.MovieError, OSError) as e:
            j.status, j.error = "failed", describe(e)
            log(f"FAILED {j.video}: {j.error}")
          else:
            j.status = "extracted"
            cues = f", {len(j.cues)} subtitle cues from {j.subtitles}" if j.cues is not None else ""
            log(f"extracted {j.video} -> {j.out} ({movie.num_frames} frames{cues})")
        videos.update(1)
  counts = {k: sum(j.status == k for j in jobs) for k in ("extracted", "skipped", "failed")}
  return counts


def parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m llamavid_jax.extract",
                              description="Videos -> ViT features [T, N+1, C] + subtitles -> .safetensors (the "
                              "release's extract_video_features_subtitles.py).")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--video", help="one video file")
  src.add_argument("--videos", help="a text file: one video path a line")
  src.add_argument("--video-dir", help="a directory of videos (not recursive)")
  p.add_argument("--ckpt", required=True, help="a converted / inference directory or a train WORKDIR")
  p.add_argument("--out", required=True, help="output directory: <video stem>.safetensors each")
  st = p.add_mutually_exclusive_group()
  st.add_argument("--subtitles", help="a .srt / .vtt file for --video")
  st.add_argument("--subtitle-dir", help="NAME.srt or NAME.vtt for each video NAME.*")
  p.add_argument("--subtitle-encoding", default=None,
                 help="the subtitle files' encoding where they have no BOM (e.g. cp1252; default UTF-8)")
  p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                 help="stored dtype (float16: the release's)")
  p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                 help="the ViT's parameters and compute")
  p.add_argument("--batch-size", type=int, default=64, help="frames per ViT step (over all devices)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The command (module docstring) -> its exit status."""
  a = parser().parse_args(argv)
  try:
    if a.batch_size < 1:
      raise UsageError(f"--batch-size {a.batch_size}: must be at least 1")
    inference.check_ckpt(a.ckpt)
    videos = list_videos(a.video, a.videos, a.video_dir)
    if os.path.exists(a.out) and not os.path.isdir(a.out):
      raise UsageError(f"--out {a.out}: not a directory")
    if a.subtitle_encoding is not None:
      try:
        codecs.lookup(a.subtitle_encoding)
      except LookupError:
        raise UsageError(f"--subtitle-encoding {a.subtitle_encoding}: no such encoding") from None
    jobs = plan(videos, a.out, subtitles=a.subtitles, subtitle_dir=a.subtitle_dir,
                subtitle_encoding=a.subtitle_encoding)
    os.makedirs(a.out, exist_ok=True)
  except (UsageError, inference.CheckpointError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  def load():
    return inference.load(a.ckpt, dtype=a.compute_dtype)

  counts = run(jobs, load, dtype=a.dtype, batch_size=a.batch_size)
  print(f"{len(jobs)} videos: extracted {counts['extracted']}, skipped {counts['skipped']} (exists), "
        f"failed {counts['failed']}")
  return 1 if counts["failed"] else 0


if __name__ == "__main__":
  cli.run(main)   # a known error: `error: <one line>`, exit 2 / 1 (--debug: the traceback)
