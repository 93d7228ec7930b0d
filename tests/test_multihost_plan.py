"""Two processes (jax.distributed over gloo, CPU) plan together: process 0 plans and
broadcasts, every process compares the hash of the global batch list before step 0. A
transient I/O error on one host is retried (equal hashes); a persistent one is the same
skip on every host; different data files stop both processes naming both hashes."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests import data_fixtures as fx
from tests import plan_fixtures as pf
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = fx.make_root(str(tmp_path_factory.mktemp("mh_plan")))
  pf.write_videos_json(root, 40, name="a.json")
  pf.write_videos_json(root, 41, name="b.json")
  return root


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run2(root, data, mode, fault="none"):
  """Both processes' (return code, output, RESULT dict or None); data: one name per process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tests.plan_worker", str(port), str(i), root, data[i], mode, fault],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  out = []
  try:
    for p in procs:
      text = p.communicate(timeout=TIMEOUT_S)[0]
      lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
      out.append((p.returncode, text, json.loads(lines[0][7:]) if lines else None))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


@pytest.mark.slow
def test_a_transient_error_on_one_host_is_retried_to_the_same_plan(root):
  (rc0, out0, r0), (rc1, out1, r1) = run2(root, ["a.json", "a.json"], "independent", "transient:1")
  assert rc0 == 0 and rc1 == 0, out0[-2000:] + out1[-2000:]
  assert r0["digest"] == r1["digest"] and r0["skips"] == r1["skips"] == []
  assert "(attempt 1 of 3); retrying" in out1 and "retrying" not in out0


@pytest.mark.slow
def test_a_persistent_error_is_the_same_skip_on_every_host(root):
  for on, skips in (("1", []), ("0", ["v1", "v4", "v7"])):   # process 0 plans for both
    data = pf.write_videos_json(root, 40, name=f"persistent{on}.json")   # no manifest yet
    (rc0, out0, r0), (rc1, out1, r1) = run2(root, [data] * 2, "shared", f"persistent:{on}")
    assert rc0 == 0 and rc1 == 0, out0[-2000:] + out1[-2000:]
    assert r0 == r1 and r0["skips"] == skips, (on, r0, r1)
    assert r0["reasons"] == (["io_error"] if skips else [])


def test_hosts_with_different_data_files_stop_naming_both_hashes(root):
  results = run2(root, ["a.json", "b.json"], "shared")
  for rc, out, r in results:
    assert rc != 0 and r is None, out[-2000:]
    assert "PlanMismatchError: the processes hold different planning keys (data file content hash + planning " \
           "config): process 0 has " in out, out[-3000:]
  msgs = [next(l for l in out.splitlines() if "PlanMismatchError" in l) for _, out, _ in results]
  assert msgs[0] == msgs[1]                      # the same two hashes named on both hosts
