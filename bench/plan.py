"""Planning time at scale: the serial probe (every header read in turn, as before
data/plan.py) against the parallel cold plan (a thread pool probes, the manifest is
written) and the cached plan (the manifest is read; nothing is probed).

  python bench/plan.py [--n 100000] [--latency_ms 1.0] [--threads 32] [--serial_n 20000]

The samples are LLaVA-JSON video samples; the header probe (`sources.probe_video`) is a
fake that sleeps `latency_ms` (a header read on a network file system) and counts its
calls. Text encoding and bucketing are the real ones. The serial probe is timed on the
first `serial_n` samples of the shuffled order and scaled to `n` (printed as such); the
other two plan all `n`.
"""

import argparse
import os
import tempfile
import time

from llamavid_jax.data import pipeline as pl
from llamavid_jax.data import plan
from tests import data_fixtures as fx
from tests import plan_fixtures as pf


class _Head:
  """The first `n` samples of a source (the serial run's subset)."""

  def __init__(self, source, n):
    self.source, self.n = source, n
    self.json_path = None

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]

  def num_frames(self, sample, **kw):
    return self.source.num_frames(sample, **kw)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=100_000)
  ap.add_argument("--latency_ms", type=float, default=1.0)
  ap.add_argument("--threads", type=int, default=32)
  ap.add_argument("--serial_n", type=int, default=20_000)
  a = ap.parse_args()
  root = fx.make_root(tempfile.mkdtemp(prefix="bench_plan_"))
  path = pf.write_videos_json(root, a.n, skip_every=1000)
  probe = pf.FakeProbe(latency_s=a.latency_ms / 1000).install()
  cfg = pf.config(root, path, max_skip_rate=0.9, plan_threads=a.threads)
  p = pl.make_pipeline(pf.config(root, pf.write_videos_json(root, 2, name="warm.json")), fx.SPEC,
                       shard_index=0, shard_count=1)   # loads the tokenizers once
  proc = p.processor.with_config(cfg)
  proc.source = pl.sources_lib.LlavaJsonSource(path, video_folder=cfg.video_folder)

  m = min(a.serial_n, a.n)
  serial = pl.SampleProcessor(cfg, fx.SPEC, _Head(proc.source, m), proc.llm_tok, proc.q_tok)
  calls, t = probe.calls, time.perf_counter()
  pl.plan_batches(cfg, serial, shard_index=0, shard_count=1)   # no verdicts: bucket_of probes each in turn
  t_serial = (time.perf_counter() - t) * a.n / m
  assert probe.calls - calls == m

  proc.planned.clear()
  calls, t = probe.calls, time.perf_counter()
  verdicts, _, where = plan.load_or_build(proc, threads=a.threads)
  proc.planned.update(verdicts)
  first = pl.plan_batches(cfg, proc, shard_index=0, shard_count=1)
  t_cold, cold_calls = time.perf_counter() - t, probe.calls - calls
  assert where and os.path.exists(where), "the manifest was not written"

  proc.planned.clear()
  calls, t = probe.calls, time.perf_counter()
  verdicts, _, read = plan.load_or_build(proc, threads=a.threads, progress=False)
  proc.planned.update(verdicts)
  again = pl.plan_batches(cfg, proc, shard_index=0, shard_count=1)
  t_cached, cached_calls = time.perf_counter() - t, probe.calls - calls
  assert read == where and again.digest == first.digest

  print(f"planning {a.n:,} video samples, header probe {a.latency_ms} ms, {os.cpu_count()} CPUs:")
  print(f"  serial probe     {t_serial:8.2f} s  (timed on {m:,} samples, scaled x{a.n / m:g})")
  print(f"  parallel cold    {t_cold:8.2f} s  ({a.threads} threads, {cold_calls:,} probes, manifest written: "
        f"{os.path.getsize(where) / 1e6:.1f} MB)")
  print(f"  cached manifest  {t_cached:8.2f} s  ({cached_calls} probes)")
  print(f"  ratios: serial / cold = {t_serial / t_cold:.1f}x, cold / cached = {t_cold / t_cached:.1f}x, "
        f"serial / cached = {t_serial / t_cached:.1f}x; cached = {100 * t_cached / t_cold:.1f}% of cold")


if __name__ == "__main__":
  main()
