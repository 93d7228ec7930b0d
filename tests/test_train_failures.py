"""Failures that stop training loudly: a checkpoint that cannot be written (disk full,
directory not creatable) ends the run at once naming the path and the errno; an
init_from checkpoint without every parameter is refused unless the config allows a
partial init; TensorBoard curves reach disk at every logging step (a killed run keeps them)."""

import errno
import os
import subprocess

import pytest

from llamavid_jax.cli import ConfigError
from tests.test_train_resume import config, events, launch, metrics
from train.checkpointing import CheckpointSaveError, load_init_params
from train.metrics import MetricLogger
from train.train import train


@pytest.fixture
def tiny_disk(tmp_path):
  """tmp_path/checkpoints on a 256 KiB tmpfs (the tiny model's first checkpoint needs more)."""
  path = tmp_path / "checkpoints"
  path.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_full_disk_stops_the_run_naming_the_path_and_errno(tmp_path, tiny_disk):
  """The first save (step 1) fails in its background write; the run stops within a few
  steps (orbax's in-progress flag is polled every step), not at the next save (40)."""
  p = launch(tmp_path, "total_steps=50", "ckpt.every=40")
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 1, out[-3000:]
  assert (f"error: saving checkpoint step 1 to {tiny_disk} failed: "
          f"[Errno 28] No space left on device (ENOSPC); ValueError: RESOURCE_EXHAUSTED") in out, out[-3000:]
  steps = [m["step"] for m in metrics(tmp_path)]
  assert steps == list(range(1, len(steps) + 1)) and 1 <= steps[-1] < 40, steps
  assert os.listdir(tiny_disk) == ["1.orbax-checkpoint-tmp"]   # never finalised


def test_uncreatable_checkpoint_directory_names_the_path(tmp_path, capsys):
  (tmp_path / "checkpoints").write_text("a file where the directory should be")
  with pytest.raises(CheckpointSaveError) as e:
    train(config(tmp_path))
  # the run-plan report is the first thing train.train prints
  assert capsys.readouterr().out.startswith("plan of the run:\n  mesh: data=8 fsdp=1 tensor=1 sequence=1 "
                                            "[the config's]\n  attention llm: xla")
  assert e.value.errno == errno.EEXIST and e.value.step is None
  assert str(e.value).startswith(f"creating the checkpoint directory {tmp_path / 'checkpoints'} failed: "
                                 f"[Errno 17] File exists (EEXIST); FileExistsError")
  assert not os.path.exists(tmp_path / "metrics.jsonl")   # stopped before the first step


def _scalars(path):
  """{tag: [(step, value)]} of the scalars in a TensorBoard events file."""
  out = {}
  for event in events(path):
    for v in event.summary.value:
      out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_tensorboard_scalars_are_on_disk_before_close(tmp_path):
  log = MetricLogger(str(tmp_path), total_steps=4, start_step=0, every=2, progress=False)
  try:
    m = dict(loss=2.5, lr=1e-3, grad_norm=0.5, tokens=40, positions=100)
    (events,) = [os.path.join(tmp_path, "tb", f) for f in os.listdir(tmp_path / "tb")]
    log.step(1, m)                       # not a logging step
    assert "train/loss" not in _scalars(events)
    log.step(2, dict(m, loss=1.25))
    got = _scalars(events)
    assert got["train/loss"] == [(2, 1.25)]
    assert got["train/positions"] == [(2, 100.0)]
    # tokens/s counts LLM positions, target_tokens_per_s the answer tokens, both over 2 steps
    (_, tps), (_, ttps) = got["train/tokens_per_s"][0], got["train/target_tokens_per_s"][0]
    assert tps == pytest.approx(ttps * 100 / 40, rel=1e-6) and tps > 0
  finally:
    log.close(png=None)


def test_init_from_without_every_parameter_is_an_error_unless_partial(tmp_path):
  """A previous stage's checkpoints/ holding `a` only, for a model with `a` and `b`:
  refused naming `b`; with partial=True (config.init_from_partial) `a` is loaded and
  `b` keeps its init."""
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(tmp_path / "checkpoints") as m:
    m.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"params": {"a": np.full(2, 7.0, np.float32)}})))
  params = {"a": jnp.zeros(2), "b": jnp.ones(3)}
  with pytest.raises(ConfigError, match=r"init_from=.*checkpoints: 1 of 2 parameter arrays of the model are not "
                                        r"there: \['b'\]; set config.init_from_partial=True"):
    load_init_params(str(tmp_path / "checkpoints"), params, None, None)
  out, n = load_init_params(str(tmp_path / "checkpoints"), params, None, None, partial=True)
  assert n == 1 and out["a"].tolist() == [7.0, 7.0] and out["b"].tolist() == [1.0, 1.0, 1.0]


def test_a_resume_with_other_model_shapes_is_refused_before_building(tiny_ckpt):
  """A WORKDIR with checkpoints (the toy tiny run) resumes only with the parameter
  shapes it was saved with; the arrays that differ are named (nothing is built)."""
  from configs import demo
  from train.train import ConfigError, check_resume
  c = demo.get_config("toy,tiny")
  c.workdir = tiny_ckpt
  check_resume(c)   # the same config: resumes
  c.model.attention_impl = "chunked"   # not a shape: allowed
  check_resume(c)
  c.model.llm.mlp_dim *= 2
  with pytest.raises(ConfigError) as e:
    check_resume(c)
  shapes, = e.value.messages
  assert shapes.startswith(f"config.model: the parameter shapes differ from the checkpoints' in {tiny_ckpt} "
                           "(3 arrays, e.g. ['llm']['layers']['down_proj']['kernel'] (2, 64, 32) -> (2, 128, 32); ")


def test_evaluators_in_a_multi_process_run_are_refused_before_anything_is_built(tmp_path, monkeypatch):
  """config.evals answers through the serving engine, a loop of one process: a run of
  several processes is refused in one line naming the way out, before any file is read."""
  import jax
  c = config(tmp_path)
  c.evals = dict(heldout=dict(bench="msvd_qa", args=dict(question_file=str(tmp_path / "none.json"))))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match=r"^config.evals: evaluators run in single-process runs only .* this run has "
                                        r"2 processes: set config.evals=\{\} and run python -m eval.run"):
    train(c)
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_resume_with_another_global_batch_size_is_refused(tmp_path):
  """The global batch is the data's: a resume may change the process count, not it."""
  train(config(tmp_path, total_steps=1))
  c = config(tmp_path, total_steps=2, batch_size=32)
  with pytest.raises(ConfigError, match=r"config.batch_size=32: the checkpoint of step 1 in .* was trained with a "
                                        r"global batch size of 16; a resume keeps it .*set config.batch_size=16"):
    train(c)
  assert [m["step"] for m in metrics(tmp_path)] == [1]


def test_the_data_position_of_several_processes_is_one_global_position():
  """The saved position: the global batch index (equal on every process) and the skip
  counters summed; a resume on M processes gives the counters to process 0 only, so
  they sum to the run's again."""
  from train.checkpointing import merge_positions, process_share
  states = [{"batch_index": 5, "seen": 30, "skips": {"io_error": 1}},
            {"batch_index": 5, "seen": 32, "skips": {"io_error": 2, "unreadable_video": 1}}]
  position = merge_positions(states)
  assert position == {"batch_index": 5, "seen": 62, "skips": {"io_error": 3, "unreadable_video": 1}}
  shares = [process_share(position, i) for i in range(3)]
  assert shares[1] == shares[2] == {"batch_index": 5, "seen": 0, "skips": {}}
  assert merge_positions(shares) == position
  with pytest.raises(RuntimeError, match=r"at different global batches \[5, 6\]"):
    merge_positions([states[0], {**states[1], "batch_index": 6}])
