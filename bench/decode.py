"""Decoding and pipeline throughput.

  python bench/decode.py [--minutes 10] [--cache DIR]

1. Generates (once, into --cache) a `minutes`-long 30-fps 854x480 H.264 video (2 s GOP)
   and prints frames/s of 1-fps sampling, seeking vs decoding every frame.
2. Generates a synthetic video-QA set and prints samples/s of the whole grain pipeline
   (decode, preprocess to 224, tokenize, batch) with 0 and 2 worker processes.
"""

import argparse
import os
import tempfile
import time

import av
import numpy as np

from llamavid_jax.data import synthetic
from llamavid_jax.data.pipeline import PipelineConfig, make_pipeline
from llamavid_jax.models.config import InputSpec
from llamavid_jax.data.video import load_video


def make_long_video(path: str, minutes: float, fps: int = 30, size=(854, 480)) -> float:
  t0 = time.perf_counter()
  w, h = size
  base = (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
  with av.open(path, "w") as out:
    s = out.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": "ultrafast", "g": str(2 * fps)}
    for i in range(int(minutes * 60 * fps)):
      img = np.stack([np.roll(base, 4 * i, 1), np.roll(base, 2 * i, 0), base], -1)
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(p)
    for p in s.encode():
      out.mux(p)
  return time.perf_counter() - t0


def pipeline_rate(root: str, workers: int, batches: int = 8) -> float:
  cfg = PipelineConfig(data_path=os.path.join(root, "train.json"), video_folder=root, image_folder=root,
                       llm_tokenizer=os.path.join(root, "tokenizers/llm"),
                       qformer_tokenizer=os.path.join(root, "tokenizers/qformer"), template="vicuna_v1",
                       buckets=((64, 4),), batch_size=16, worker_count=workers)
  it = iter(make_pipeline(cfg, InputSpec(tokens_per_frame=2, image_size=224, feature_shape=(257, 1408))))
  next(it)                                      # warm-up: worker start, first batch
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.batch_size / (time.perf_counter() - t0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--minutes", type=float, default=10)
  ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "llamavid_bench"))
  a = ap.parse_args()
  os.makedirs(a.cache, exist_ok=True)
  path = os.path.join(a.cache, f"long_{a.minutes:g}min_30fps_480p.mp4")
  if not os.path.exists(path):
    secs = make_long_video(path, a.minutes)
    print(f"generated {path} in {secs:.0f} s")
  for seek in (True, False):
    t0 = time.perf_counter()
    frames, info = load_video(path, fps=1.0, seek=seek)
    dt = time.perf_counter() - t0
    print(f"1-fps sampling, {'seeking ' if seek else 'decode all'}: {len(frames)} frames of "
          f"{info['num_frames']} in {dt:.1f} s = {len(frames) / dt:.1f} frames/s ({info['decoded']} decoded)")
  root = os.path.join(a.cache, "synthetic")
  if not os.path.exists(os.path.join(root, "train.json")):
    synthetic.generate(root, num_train=400, num_eval=0, size=112, frames=4)
  for workers in (0, 2):
    print(f"pipeline (4-frame 112px clips -> 224, batch 16), {workers} workers: "
          f"{pipeline_rate(root, workers):.1f} samples/s")


if __name__ == "__main__":
  main()
