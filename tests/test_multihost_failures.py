"""One host's failure stops every host, through the real entry point with 2 processes x
4 CPU devices (jax.distributed over gloo): a failed save on one process stops both at
the next step boundary naming the process and the errno; SIGTERM to one process makes
both save the same step, and the resume equals an uninterrupted run bitwise; SIGKILL
to one process makes the other exit non-zero within 60 s, first printing one line that
names the lost process and says to resume from the last checkpoint."""

import os
import re
import signal
import time

import orbax.checkpoint as ocp
import pytest

from tests.test_multihost_plan import _free_port
from tests.test_train_resume import launch, metrics

# Fault injection over 2 processes x 4 devices, minutes each and sensitive to a loaded
# machine (the SIGTERM case failed twice in 10 runs on a busy 2-core box): opt-in, as
# `make test-faults` (LLAMAVID_FAULT_TESTS=1), not part of `make test`.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("LLAMAVID_FAULT_TESTS") != "1",
                                                   reason="fault injection: make test-faults")]


def launch2(workdir, *overrides, port=None):
  port = port or _free_port()
  return [launch(workdir, "mesh.data=2", "mesh.fsdp=4", "distributed.num_processes=2",
                 f"distributed.process_id={i}", f"distributed.coordinator=localhost:{port}", *overrides, devices=4)
          for i in range(2)]


def wait_all(procs, timeout):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def wait_for_step(workdir, procs, step, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(path) and len(open(path).readlines()) >= step:
      return
    time.sleep(0.1)
  outs = []
  for p in procs:
    if p.poll() is None:
      p.kill()
    outs.append(p.communicate()[0][-3000:])
  raise AssertionError(f"step {step} not reached; return codes {[p.returncode for p in procs]}:\n" + "\n".join(outs))


def test_a_failed_save_on_one_process_stops_both_naming_it(tmp_path):
  procs = launch2(tmp_path, "total_steps=40", "ckpt.every=2", "debug.fail_save_process=1")
  outs = wait_all(procs, timeout=300)
  assert [p.returncode for p in procs] == [1, 1], outs[0][-3000:] + outs[1][-3000:]
  errors = [[l for l in out.splitlines() if l.startswith("error: ")] for out in outs]
  ckpts = tmp_path / "checkpoints"
  # the first save (step 1) "fails" in its background write on process 1 only
  assert errors[1][0].startswith(f"error: process 1: saving checkpoint step 1 to {ckpts} failed: [Errno 28] "
                                 "No space left on device (ENOSPC)"), outs[1][-3000:]
  assert errors[0][0].startswith("error: process 1 failed to save checkpoint step 1: [Errno 28] No space left on "
                                 "device (ENOSPC); every process stops at step "), outs[0][-3000:]
  step = int(errors[0][0].split("stops at step ")[1].split()[0])
  assert 1 < step <= 3 and len(metrics(tmp_path)) < 40          # at the next step boundaries, not at the end
  for e in errors:                                               # the same step boundary on both
    assert e[0].endswith(f"every process stops at step {step} (resume from the last checkpoint)"), e


def _saved(workdir):
  return ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes_bitwise(tmp_path):
  ref = tmp_path / "ref"
  outs = wait_all(launch2(ref, "total_steps=6", "ckpt.every=100"), timeout=300)
  want = {m["step"]: m["loss"] for m in metrics(ref)}
  assert sorted(want) == [1, 2, 3, 4, 5, 6], outs[0][-3000:]
  run = tmp_path / "run"
  procs = launch2(run, "total_steps=6", "ckpt.every=100")
  wait_for_step(run, procs, 2)
  procs[1].send_signal(signal.SIGTERM)
  outs = wait_all(procs, timeout=120)
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert all("(preempted)" in out for out in outs)
  last = metrics(run)[-1]["step"]
  assert max(_saved(run)) == last and 2 <= last < 6, (_saved(run), last)   # saved where it stopped
  from train.checkpointing import DATA_POSITION, saved_json
  assert saved_json(run / "checkpoints", last, DATA_POSITION) == {"batch_index": last}   # the data, at that step
  outs = wait_all(launch2(run, "total_steps=6", "ckpt.every=100"), timeout=300)
  got = {}
  for m in metrics(run):
    got[m["step"]] = m["loss"]
  assert got == want, (got, want, outs[0][-2000:])   # bitwise: float equality


def test_sigkill_to_one_process_stops_the_other_promptly_saying_what_to_do(tmp_path):
  procs = launch2(tmp_path, "total_steps=100000", "ckpt.every=3", "distributed.heartbeat_timeout_s=10")
  try:
    wait_for_step(tmp_path, procs, 4)
    procs[1].kill()
    t0 = time.time()
    out = procs[0].communicate(timeout=90)[0]
    elapsed = time.time() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  print(f"process 0 exited {procs[0].returncode} {elapsed:.1f} s after process 1 was killed")
  if os.environ.get("KILL_OUT"):
    open(os.environ["KILL_OUT"], "w").write(out)
  assert procs[0].returncode != 0 and elapsed < 60, out[-3000:]
  # its first word on it, before any dump of the runtime (E/F log lines), names the lost
  # process and says what to do
  lines = out.splitlines()
  ours = next((i for i, l in enumerate(lines) if l.startswith("error: lost ")), None)
  dump = next((i for i, l in enumerate(lines) if re.match(r"[EF]\d{4} ", l)), len(lines))
  assert ours is not None and ours < dump, out[-3000:]
  assert lines[ours].startswith("error: lost process 1 ("), lines[ours]
  assert re.search(r"every process stops: restart all of them to resume from the last checkpoint, step \d+$",
                   lines[ours]), lines[ours]
