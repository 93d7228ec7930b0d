"""Synthetic planning data for the plan tests and bench/plan.py: a LLaVA JSON of video
samples whose header probe (`sources.probe_video`) is replaced by a counting fake, with
faults injected on chosen files (an OSError(EIO) a given number of times)."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

from llamavid_jax.data import pipeline as pl
from llamavid_jax.data import sources as sources_lib
from tests import data_fixtures as fx

BUCKETS = ((48, 4), (48, 8))   # a video of <= 4 sampled frames -> bucket 0, else 1


def write_videos_json(root: str, n: int, name: str = "data.json", skip_every: int = 0) -> str:
  """`n` video samples `v{i}.mp4` (nothing on disk: the probe is faked); with
  `skip_every`, every such sample has no gpt turn (a data skip)."""
  q = fx.qa("<image>\nWhat is this?", "A cat.")
  samples = [{"id": f"v{i}", "video": f"v{i}.mp4",
              "conversations": q[:1] if skip_every and i % skip_every == skip_every - 1 else q}
             for i in range(n)]
  path = os.path.join(root, name)
  with open(path, "w") as f:
    json.dump(samples, f)
  return path


def config(root: str, data_path: str, **kw) -> pl.PipelineConfig:
  base = dict(data_path=data_path, video_folder=os.path.join(root, "videos"),
              llm_tokenizer=os.path.join(root, "llm"), qformer_tokenizer=os.path.join(root, "bert"),
              template="vicuna_v1", buckets=BUCKETS, batch_size=2, max_len=128, qformer_max_len=8,
              max_frames=8, video_fps=None, read_threads=0, max_skip_rate=0.5, min_samples_for_skip_rate=1)
  return pl.PipelineConfig(**{**base, **kw})


class FakeProbe:
  """Stands in for `sources.probe_video`: counts calls (file opens); sample `vI` has
  3 + I % 6 frames at 1 fps; `faults[name] = k` raises OSError(EIO) on its first k
  probes (k < 0: always); `latency_s`: sleep per probe (a network file system)."""

  def __init__(self, faults: dict[str, int] | None = None, latency_s: float = 0.0):
    self.faults, self.latency_s = dict(faults or {}), latency_s
    self.calls = 0
    self._lock = threading.Lock()

  def __call__(self, path: str) -> tuple[int, float]:
    name = os.path.basename(path)
    with self._lock:
      self.calls += 1
      left = self.faults.get(name, 0)
      if left:
        self.faults[name] = left - 1 if left > 0 else left
    if self.latency_s:
      time.sleep(self.latency_s)
    if left:
      raise OSError(errno.EIO, "Input/output error", path)
    return 3 + int(name[1:].split(".")[0]) % 6, 1.0

  def install(self, monkeypatch=None) -> "FakeProbe":
    if monkeypatch is not None:
      monkeypatch.setattr(sources_lib, "probe_video", self)
    else:
      sources_lib.probe_video = self
    return self
