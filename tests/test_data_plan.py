"""One plan, built once (`data/plan.py`): the planning verdicts are cached as a manifest
next to the data (a rerun opens no media file), keyed by the data file's content and the
planning config; an I/O hiccup while probing or loading is retried, a persistent one is
the skip `io_error` (never cached). The probe is `plan_fixtures.FakeProbe` (counts calls)."""

import errno
import json
import logging
import os
import time

import numpy as np
import pytest

from llamavid_jax.data import pipeline as pl
from llamavid_jax.data import plan
from tests import data_fixtures as fx
from tests import plan_fixtures as pf


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return fx.make_root(str(tmp_path_factory.mktemp("plan")))


def _plan(root, path, **kw):
  return pl.make_pipeline(pf.config(root, path, **kw), fx.SPEC, shard_index=0, shard_count=1)


@pytest.mark.slow
def test_a_second_run_reads_the_manifest_and_opens_no_file(root, monkeypatch):
  path = pf.write_videos_json(root, 20_000, name="big.json", skip_every=1000)
  probe = pf.FakeProbe().install(monkeypatch)
  t0 = time.perf_counter()
  cold = _plan(root, path)
  t1 = time.perf_counter()
  assert probe.calls == 20_000
  (manifest,) = [f for f in os.listdir(root) if f.startswith("big.json.plan-")]
  warm = _plan(root, path)
  t2 = time.perf_counter()
  print(f"planning 20,000 samples: cold {t1 - t0:.2f} s ({20_000} probes), from the manifest "
        f"{t2 - t1:.2f} s ({probe.calls - 20_000} probes)")
  assert probe.calls == 20_000                              # the rerun probed nothing
  assert warm.plan.digest == cold.plan.digest
  assert [s.id for s in warm.plan.skips] == [s.id for s in cold.plan.skips]
  assert sorted(s.index for s in warm.plan.skips) == list(range(999, 20_000, 1000))
  assert [s.reason for s in warm.plan.skips] == ["no_gpt_turn"] * 20
  with open(os.path.join(root, manifest)) as f:
    m = json.load(f)
  # v0: 3 frames -> bucket 0, v5: 8 frames -> bucket 1
  assert m["num_samples"] == 20_000 and m["verdicts"][0] == ["frames", 0] and m["verdicts"][5] == ["frames", 1]


def test_a_changed_data_file_or_config_plans_again(root, monkeypatch):
  path = pf.write_videos_json(root, 30, name="small.json")
  probe = pf.FakeProbe().install(monkeypatch)
  first = _plan(root, path)
  _plan(root, path, num_epochs=2, batch_size=3)   # not planning settings: the manifest holds
  assert probe.calls == 30
  _plan(root, path, max_frames=4)                 # another frame cap: other verdicts
  assert probe.calls == 60
  pf.write_videos_json(root, 31, name="small.json")   # the data file changed
  again = _plan(root, path)
  assert probe.calls == 91 and again.plan.digest != first.plan.digest
  assert len([f for f in os.listdir(root) if f.startswith("small.json.plan-")]) == 3


def test_manifest_goes_to_the_cache_dir_where_the_data_dir_is_not_writable(tmp_path):
  blocked = tmp_path / "a_file"
  blocked.write_text("not a folder")
  m = {"version": plan.MANIFEST_VERSION, "key": "k", "num_samples": 0, "verdicts": []}
  where = plan.write_manifest([str(blocked / "d.json.plan-k.json"), str(tmp_path / "cache" / "d.json.plan-k.json")], m)
  assert where == str(tmp_path / "cache" / "d.json.plan-k.json")
  assert plan.read_manifest(where, "k", 0) == {}
  assert plan.read_manifest(where, "other key", 0) is None


def test_a_transient_io_error_is_retried_and_a_persistent_one_is_an_uncached_skip(root, monkeypatch, caplog):
  path = pf.write_videos_json(root, 12, name="flaky.json")
  clean = pf.FakeProbe().install(monkeypatch)
  reference = _plan(root, path, plan_cache_dir="", io_attempts=3)
  os.remove(os.path.join(root, [f for f in os.listdir(root) if f.startswith("flaky.json.plan-")][0]))
  flaky = pf.FakeProbe({"v1.mp4": 1, "v4.mp4": 1, "v7.mp4": 1}).install(monkeypatch)
  with caplog.at_level(logging.WARNING, logger="llamavid_jax.data.plan"):
    got = _plan(root, path, io_attempts=3)
  assert flaky.calls == 12 + 3 and got.plan.digest == reference.plan.digest and got.plan.skips == []
  retries = sorted(r.getMessage() for r in caplog.records if "retrying" in r.getMessage())
  assert len(retries) == 3 and retries[0].startswith(
      f"probing sample 'v1' ({root}/videos/v1.mp4): OSError: [Errno 5] Input/output error: ")
  assert retries[0].endswith("(attempt 1 of 3); retrying in 0.10 s")
  os.remove(os.path.join(root, [f for f in os.listdir(root) if f.startswith("flaky.json.plan-")][0]))
  stuck = pf.FakeProbe({"v1.mp4": -1, "v4.mp4": -1, "v7.mp4": -1}).install(monkeypatch)
  got = _plan(root, path, io_attempts=3, max_skip_rate=0.9)
  assert stuck.calls == 9 + 3 * 3
  assert sorted((s.id, s.reason) for s in got.plan.skips) == [("v1", "io_error"), ("v4", "io_error"), ("v7", "io_error")]
  got.plan.skips.sort(key=lambda s: s.index)
  assert got.plan.skips[0].detail == f"OSError: [Errno 5] Input/output error: '{root}/videos/v1.mp4' (after 3 attempts)"
  assert not [f for f in os.listdir(root) if f.startswith("flaky.json.plan-")]   # not cached
  del clean


def test_a_transient_io_error_while_loading_is_retried(root, monkeypatch):
  path = pf.write_videos_json(root, 4, name="load.json")
  pf.FakeProbe().install(monkeypatch)
  p = _plan(root, path, io_attempts=2)
  calls = []

  def example(self, index, key):
    calls.append(index)
    if calls.count(index) == 1 and index == 2:
      raise OSError(errno.ETIMEDOUT, "Connection timed out", "v2.mp4")
    if index == 3:
      raise OSError(errno.EIO, "Input/output error", "v3.mp4")
    return self.empty_row(key) | {"sample_index": np.int64(index)}

  monkeypatch.setattr(pl.SampleProcessor, "example", example)
  monkeypatch.setattr(plan.time, "sleep", lambda s: None)
  it = iter(p)
  rows = sorted(int(i) for b in it for i in b["sample_index"])
  assert rows == [-1, 0, 1, 2]            # 2 retried and loaded; 3 kept failing: a padding row
  assert it.skip_counts == {"io_error": 1} and calls.count(2) == 2 and calls.count(3) == 2
