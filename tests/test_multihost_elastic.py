"""Elastic resume: a run saved with 2 processes resumes with 1, and one saved with 1
resumes with 2 (jax.distributed over gloo, 4 CPU devices in all, the same global
batch and mesh: data 2 x fsdp 2, with 2 processes data across them and the parameters
split over each one's 2 devices), from the same step on the same global batches (by sample id) to the losses of
the uninterrupted run. Orbax reshards the arrays; the data position is global
(train/checkpointing.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_multihost_failures import wait_all
from tests.test_multihost_plan import _free_port
from tests.conftest import xla_flags

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300   # one run: start, compile the tiny model, 6 steps (a loaded 2-core box)
DEVICES = 4       # in all: 2 processes x 2, or 1 x 4 (the same mesh, data 2 x fsdp 2)


def run(n, workdir, out):
  """n processes of tests/elastic_worker.py -> process 0's losses {step: loss}. The runs
  share a compilation cache (OUT/jax_cache): a run on 2 processes after another
  compiles nothing, so its processes reach the first collective together."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
             JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             XLA_FLAGS=xla_flags(DEVICES // n),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tests.elastic_worker", str(port), str(i), str(n), str(workdir),
                             str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n)]
  texts = wait_all(procs, TIMEOUT_S)
  assert [p.returncode for p in procs] == [0] * n, "\n".join(t[-3000:] for t in texts)
  result = json.loads(next(l for l in texts[0].splitlines() if l.startswith("RESULT "))[7:])
  return {int(k): v for k, v in result["losses"].items()}


def global_batches(out, n):
  """{batch index: the global batch's sample ids} of the runs with n processes
  (process 0's rows first); a batch index taken twice by one run count is an error."""
  rows = {}
  for i in range(n):
    with open(os.path.join(out, f"ids_{n}_{i}.jsonl")) as f:
      for line in f:
        r = json.loads(line)
        assert (r["batch_index"], i) not in rows, r
        rows[r["batch_index"], i] = r["ids"]
  return {b: sum((rows[b, i] for i in range(n)), []) for b in sorted({b for b, _ in rows})}


def keep_until(workdir, step):
  for s in os.listdir(workdir / "checkpoints"):
    if s.isdigit() and int(s) > step:
      shutil.rmtree(workdir / "checkpoints" / s)


def test_saved_with_two_processes_resumes_with_one_and_back(tmp_path):
  wd, out = tmp_path / "wd", tmp_path / "ids"
  out.mkdir()
  want = run(2, wd, out)                       # uninterrupted: steps 1..6 on 2 processes
  assert sorted(want) == [1, 2, 3, 4, 5, 6]
  want_batches = global_batches(out, 2)
  assert sorted(want_batches) == list(range(6)) and all(len(b) == 16 for b in want_batches.values())
  (out / "ids_2_0.jsonl").unlink()
  (out / "ids_2_1.jsonl").unlink()

  keep_until(wd, 2)                            # as if stopped after saving step 2
  got = run(1, wd, out)                        # 2 -> 1 process: steps 3..6
  assert sorted(got) == [3, 4, 5, 6]
  diffs = [abs(got[s] - want[s]) for s in got]
  assert max(diffs) <= 1e-6, (got, want)
  one = global_batches(out, 1)
  assert one == {b: want_batches[b] for b in range(2, 6)}

  keep_until(wd, 4)                            # step 4 was saved by the 1-process run
  got = run(2, wd, out)                        # 1 -> 2 processes: steps 5, 6
  assert sorted(got) == [5, 6]
  diffs += [abs(got[s] - want[s]) for s in got]
  assert max(diffs) <= 1e-6, (got, want)
  assert global_batches(out, 2) == {b: want_batches[b] for b in (4, 5)}
  print(f"uninterrupted losses {want}; the resumed runs' largest difference {max(diffs):.3g}")
