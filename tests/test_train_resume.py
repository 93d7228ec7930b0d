"""Fault tolerance and multi-process training, through the real entry point
(`python -m train.train`) in subprocesses: SIGKILL + resume is bitwise identical to
an uninterrupted run, SIGTERM saves before exiting, a NaN loss stops the run naming
the step and samples (2 processes matching one: tests/test_multihost_elastic.py). In process: a resume re-logs no step twice and warns when it changes the
schedule; the logged positions are every LLM position of the batch."""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from llamavid_jax.models import spliced_length
from llamavid_jax.models.config import from_dict
from train.train import train
from tests.conftest import xla_flags

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/demo.py:toy,tiny"


def env(devices=8):
  e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
           XLA_FLAGS=xla_flags(devices))
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  return e


def launch(workdir, *overrides, devices=8):
  cmd = [sys.executable, "-m", "train.train", f"--config={CONFIG}", f"--config.workdir={workdir}",
         *[f"--config.{o}" for o in overrides]]
  return subprocess.Popen(cmd, cwd=REPO, env=env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def events(path):
  """The tensorboard Events of an events file (TFRecords: length, crc, data, crc)."""
  from tensorboardX.proto.event_pb2 import Event
  with open(path, "rb") as f:
    data = f.read()
  out, i = [], 0
  while i + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return out


def restore_params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def config(workdir, **kw):
  c = demo.get_config("toy,tiny")
  c.workdir = str(workdir)
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """6 uninterrupted steps in this process (the same 8 devices and flags)."""
  wd = tmp_path_factory.mktemp("ref")
  out = train(config(wd))
  return out["losses"], jax.tree.map(np.asarray, out["state"]["params"]), wd


def test_sigkill_after_save_then_resume_is_bitwise_identical(reference, tmp_path):
  ref_losses, ref_params, _ = reference
  p = launch(tmp_path, "debug.kill_after_save_step=4")
  out, _ = p.communicate(timeout=300)
  assert p.returncode == -signal.SIGKILL, out[-3000:]
  killed = metrics(tmp_path)
  assert [m["step"] for m in killed] == [1, 2, 3, 4]
  p = launch(tmp_path)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  resumed = metrics(tmp_path)[4:]
  assert [m["step"] for m in resumed] == [5, 6]                  # it resumed at 4, not from scratch
  got = {m["step"]: m["loss"] for m in killed + resumed}
  assert got == ref_losses                                       # bitwise: float equality
  params = restore_params(tmp_path, 6)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_sigterm_saves_before_exiting(tmp_path):
  p = launch(tmp_path, "total_steps=100000", "ckpt.every=100000")
  path = os.path.join(tmp_path, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and p.poll() is None:
    if os.path.exists(path) and len(open(path).readlines()) >= 3:
      break
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out[-3000:]
  assert "(preempted)" in out
  last = metrics(tmp_path)[-1]["step"]
  assert last >= 3
  steps = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints")).all_steps()
  assert max(steps) == last, (steps, last)            # saved at the step it stopped, not a periodic one
  from train.checkpointing import DATA_POSITION, saved_json
  position = saved_json(os.path.join(tmp_path, "checkpoints"), last, DATA_POSITION)
  assert position == {"batch_index": last}           # the data iterator's position travels with it


def test_nan_loss_stops_naming_step_and_samples(tmp_path):
  c = config(tmp_path, total_steps=4)
  c.data.nan_batch = 2                                  # third batch (step 3): NaN frames
  with pytest.raises(FloatingPointError, match=r"at step 3 .*sample indices \(rows of the data file\) in the batch: \[32, 33, .*, 47\]"):
    train(c)
  assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


def test_next_stage_starts_from_the_previous_stages_parameters(reference, tmp_path):
  """init_from = the previous stage's checkpoints/: its parameters, a fresh optimizer
  (stage 3's trainable set) and step 0 (one step at lr 1e-30 leaves the parameters as loaded)."""
  _, ref_params, ref_wd = reference
  c = config(tmp_path, total_steps=1)
  c.init_from = os.path.join(ref_wd, "checkpoints")
  c.optim.trainable = [r"llm/", r"token_gen/mm_projector/"]
  c.optim.lr = 1e-30   # far under a float32 ulp of any parameter: one step leaves them as loaded
  out = train(c)
  assert int(out["state"]["step"]) == 1 and sorted(out["losses"]) == [1]
  for a, b in zip(jax.tree.leaves(out["state"]["params"]), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_resume_drops_the_metrics_logged_after_its_checkpoint(reference, tmp_path):
  """A run killed after step 6 with its last checkpoint at 4: the resume redoes 5 and 6
  and metrics.jsonl holds every step once, each line the uninterrupted run's."""
  _, _, ref_wd = reference
  wd = tmp_path / "run"
  shutil.copytree(ref_wd, wd)
  shutil.rmtree(wd / "checkpoints" / "6")
  assert [m["step"] for m in metrics(wd)] == [1, 2, 3, 4, 5, 6]
  before = set(os.listdir(wd / "tb"))
  out = train(config(wd))
  assert sorted(out["losses"]) == [5, 6]
  assert metrics(wd) == metrics(ref_wd)                          # bitwise: float equality
  (new,) = set(os.listdir(wd / "tb")) - before                   # TensorBoard hides the old 5, 6
  purge, *logged = [e for e in events(wd / "tb" / new) if e.HasField("session_log") or e.HasField("summary")]
  assert (purge.step, purge.session_log.status) == (5, purge.session_log.START)
  assert [e.step for e in logged] == [5, 6]


def _schedule_warnings(caplog):
  return [r.getMessage() for r in caplog.records if "changed schedule" in r.getMessage()]


def test_resume_with_a_changed_schedule_says_what_changed(reference, tmp_path, caplog):
  _, _, ref_wd = reference
  shutil.copytree(ref_wd, tmp_path / "run")
  c = config(tmp_path / "run", total_steps=8)
  c.optim.lr = 1e-3
  with caplog.at_level(logging.WARNING):
    out = train(c)
  assert sorted(out["losses"]) == [7, 8]
  assert _schedule_warnings(caplog) == ["resumed with a changed schedule: total_steps 6 -> 8, optim.lr 0.002 -> 0.001"]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train(c)                 # step 8 was saved under the new schedule: nothing changed
  assert _schedule_warnings(caplog) == []


def test_logged_positions_are_every_llm_position_of_the_batch(reference):
  """B * S' with S' = S + P*(T*tokens_per_frame - 1): 16 rows x (12 + 1*(2*2 - 1)) for
  the tiny config (text 12, 2 frames, 2 tokens per frame), padding included; `tokens`
  stays the answer (target) tokens."""
  _, _, ref_wd = reference
  c = config(ref_wd)
  tpf = from_dict(c.model).tokens_per_frame
  assert tpf == 2 and spliced_length(12, 2, tpf) == 15
  for m in metrics(ref_wd):
    assert m["positions"] == c.batch_size * spliced_length(c.data.text_len, c.data.num_frames, tpf) == 240
    assert 0 < m["tokens"] < 240
