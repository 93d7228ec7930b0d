"""Thin wrapper over `orbax.checkpoint.CheckpointManager`.

One checkpoint = `state` (step, params, optimizer state; sharded arrays, written
asynchronously by every process) + `data_position` (where the data is: one JSON for
the whole run, `data_position`) + `schedule` (a JSON of the config the learning-rate
schedule and the data order depend on: a resume that changes it warns, one that
changes the global batch size is refused). Saves every `every` steps, keeps `keep`.

Nothing in a checkpoint depends on the number of processes: Orbax restores the
arrays onto any mesh, and the data position is global, so a run saved with N
processes resumes with M (the same global batch size). A data iterator's contract:
`get_state()` -> a JSON dict holding `batch_index`, the global index of the next
batch (the same on every process: every process walks the same global batch list),
and additive counters of this process's rows (ints, or dicts of ints: e.g. the skip
counts); `set_state(state)` moves it there. The saved position sums the counters over
the processes; a resume gives them to process 0 and zeros to the others
(`process_share`), so their sum stays the run's.

A failed save raises `CheckpointSaveError` naming the step, the directory and the
errno: synchronously from `save`, or for a background (async) write from `poll` (called
every step; it waits for nothing) or the next `save` / `close`, whichever comes first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from llamavid_jax.checkpoint import layout

DATA_POSITION = "data_position"   # the item of a step that holds the data position
SCHEDULE = "schedule"


def _allgather_json(obj) -> list:
  """Every process's JSON-able `obj`, in process order (a collective)."""
  from jax.experimental import multihost_utils
  mine = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.int32(len(mine)))))
  every = np.asarray(multihost_utils.process_allgather(np.pad(mine, (0, n - len(mine)))))
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in every.reshape(jax.process_count(), n)]


def merge_positions(states: list[dict]) -> dict:
  """The run's data position from every process's iterator state: `batch_index` (equal
  on every process, else RuntimeError naming them), the counters summed."""
  indices = [s["batch_index"] for s in states]
  if len(set(indices)) != 1:
    raise RuntimeError(f"the processes' data iterators are at different global batches {indices}: "
                       "they must walk one global batch list")
  out = {}
  for s in states:
    for k, v in s.items():
      if k == "batch_index":
        out[k] = v
      elif isinstance(v, dict):
        mine = out.setdefault(k, {})
        for r, n in v.items():
          mine[r] = mine.get(r, 0) + int(n)
      elif isinstance(v, int) and not isinstance(v, bool):
        out[k] = out.get(k, 0) + v
      else:
        raise TypeError(f"data iterator state {k}={v!r}: expected batch_index and int (or dict of int) counters")
  return out


def process_share(position: dict, process_index: int) -> dict:
  """Process `process_index`'s iterator state for the run's `position`: the batch
  index, and the counters on process 0 only (zeros elsewhere)."""
  if process_index == 0:
    return dict(position)
  return {k: v if k == "batch_index" else ({} if isinstance(v, dict) else 0) for k, v in position.items()}


def data_position(data_iter) -> dict:
  """The run's data position now (`merge_positions` of every process's state; a
  collective when there are several: every process calls it at the same step)."""
  state = data_iter.get_state()
  return merge_positions(_allgather_json(state) if jax.process_count() > 1 else [state])


def saved_json(directory: str, step: int, item: str) -> dict | None:
  """The JSON item `item` (`SCHEDULE`, `DATA_POSITION`) saved with `step` in checkpoint
  `directory`; None when that step has none (read without a CheckpointManager: the
  checks before anything is built use it too)."""
  path = os.path.join(os.path.abspath(directory), str(step), item)
  if not os.path.isdir(path):
    return None
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
    return dict(ck.restore(path, args=ocp.args.JsonRestore()))


class CheckpointSaveError(OSError):
  """A checkpoint could not be written. errno/strerror: from the underlying error (an
  OSError, or tensorstore's "[os_error_code=28]" text) where it has one, else None;
  filename: the checkpoint directory; step: the step being saved (None: creating the
  directory); the underlying error is the __cause__."""

  def __init__(self, step: int | None, directory: str, cause: BaseException):
    code = _errno_of(cause)
    super().__init__(code, os.strerror(code) if code else None, directory)
    self.step, self.cause = step, cause

  def __str__(self):
    what = (f"[Errno {self.errno}] {self.strerror} ({errno.errorcode.get(self.errno, '?')})"
            if self.errno else "no errno")
    where = (f"saving checkpoint step {self.step} to" if self.step is not None
             else "creating the checkpoint directory")
    return f"{where} {self.filename} failed: {what}; {type(self.cause).__name__}: {self.cause}"


def _errno_of(e: BaseException | None) -> int | None:
  """The first errno along the exception chain: OSError.errno or tensorstore's text."""
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return e.errno
    m = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(e))
    if m:
      return int(m.group(1) or m.group(2))
    e = e.__cause__ or e.__context__
  return None


_REGISTERED = []


def _array_handler(min_replica_slice_bytes: int):
  """Replicated arrays are saved replica-parallel (each replica writes a slice) only
  from this size up: orbax compiles a slice per (shape, device), which for the many
  small leaves of a model (norms, biases, tiny test models) costs more than it saves."""
  if _REGISTERED == [min_replica_slice_bytes]:
    return
  _REGISTERED[:] = [min_replica_slice_bytes]
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=min_replica_slice_bytes),
      override=True)


class Checkpointer:
  """schedule: a JSON-able dict saved with every checkpoint (see `schedule`)."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True,
               min_replica_slice_bytes: int = 1 << 20, schedule: dict | None = None):
    _array_handler(min_replica_slice_bytes)
    self.directory = os.path.abspath(directory)
    self._schedule = schedule
    self._saving = None   # the step of a save started and not yet seen to finish
    self.inject_errno = 0   # fault injection (config.debug.fail_save_process): saves "fail" with it
    with self._failure(None):
      os.makedirs(self.directory, exist_ok=True)   # orbax accepts a file here and fails at the first save
      self.mngr = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True))

  @contextlib.contextmanager
  def _failure(self, step: int | None):
    """Re-raises any error as CheckpointSaveError for `step` (the original as cause)."""
    try:
      yield
    except CheckpointSaveError:
      raise
    except Exception as e:
      raise CheckpointSaveError(step, self.directory, e) from e

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save without `force`."""
    return step not in self.mngr.all_steps() and self.mngr.should_save(step)

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started."""
    if step in self.mngr.all_steps():
      return False
    self.wait()   # orbax would too; here a failure of the previous save is named by its step
    items = {layout.STATE: ocp.args.StandardSave(state), DATA_POSITION: ocp.args.JsonSave(data_position(data_iter))}
    if self._schedule is not None:
      items[SCHEDULE] = ocp.args.JsonSave(self._schedule)
    with self._failure(step):
      started = self.mngr.save(step, args=ocp.args.Composite(**items), force=force)
    self._saving = step if started else None
    return started

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """abstract_state: jax.ShapeDtypeStruct tree with shardings (any mesh, any process
    count) -> state; the data iterator is moved to this process's share of the saved
    data position (`process_share`)."""
    step = self.latest_step() if step is None else step
    position = saved_json(self.directory, step, DATA_POSITION)
    if position is None:
      raise FileNotFoundError(f"{self.directory}/{step}: no {DATA_POSITION} (a checkpoint of an older version)")
    out = self.mngr.restore(step, args=ocp.args.Composite(**{
        layout.STATE: ocp.args.StandardRestore(abstract_state)}))
    data_iter.set_state(process_share(position, jax.process_index()))
    return out[layout.STATE]

  def schedule(self, step: int | None = None) -> dict | None:
    """The `schedule` dict saved with `step` (default: the latest); None if it has none."""
    return saved_json(self.directory, self.latest_step() if step is None else step, SCHEDULE)

  def wait(self):
    """Blocks until a background save is done; raises CheckpointSaveError if it failed."""
    with self._failure(self._saving):
      self.mngr.wait_until_finished()
      if self.inject_errno and self._saving is not None:   # as if the background write had failed
        raise OSError(self.inject_errno, os.strerror(self.inject_errno), self.directory)
    self._saving = None

  def poll(self):
    """Raises CheckpointSaveError if a background save has finished and failed; never
    waits for one still running (it only reads orbax's in-progress flag)."""
    if self._saving is not None and not self.mngr.is_saving_in_progress():
      self.wait()

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any got the preemption notice (multi-process runs
    with jax.distributed's preemption service); False otherwise."""
    return jax.process_count() > 1 and self.mngr.reached_preemption(step)

  def close(self):
    self.wait()
    self.mngr.close()


def abstract_like(shardings, shapes):
  """ShapeDtypeStructs with shardings for restore, from a shape tree and a sharding tree."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def load_init_params(path: str, params, mesh, model_cfg, partial: bool = False):
  """`params` (initialised, sharded) with every leaf found at `path` replaced by the
  stored one: `path` is a converted checkpoint (llamavid_jax.checkpoint.orbax_io
  layout) or a previous stage's `checkpoints/` directory (its latest step's
  parameters). A leaf of the model missing at `path` is a `ConfigError` listing them,
  unless `partial` (config.init_from_partial: e.g. Vicuna + EVA-ViT-g + Q-Former
  converted, the projectors new), where they keep their fresh init (logged).
  -> (params, number of leaves loaded)."""
  path = os.path.abspath(path)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if layout.is_inference_dir(path):
    from llamavid_jax.checkpoint import orbax_io
    loaded = orbax_io.restore(path, mesh, cfg=model_cfg)
  else:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    with ocp.CheckpointManager(path) as m:
      step = m.latest_step()
      if step is None:
        raise FileNotFoundError(f"init_from={path}: no checkpoint there")
      item = {"params": target}
      loaded = m.restore(step, args=ocp.args.Composite(**{layout.STATE: ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)}))[layout.STATE]["params"]
  # a partial restore gives the leaves the checkpoint lacks back as their ShapeDtypeStruct
  new = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]
         if not isinstance(v, jax.ShapeDtypeStruct)}
  for k, v in new.items():
    if k not in flat:
      raise ValueError(f"init_from={path}: {k} is not a parameter of this model")
    if v.shape != flat[k].shape:
      raise ValueError(f"init_from={path}: {k} has shape {v.shape}, the model {flat[k].shape}")
  missing = [k for k in flat if k not in new]
  if missing and not partial:
    from llamavid_jax.cli import ConfigError
    shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
    raise ConfigError(f"init_from={path}: {len(missing)} of {len(flat)} parameter arrays of the model are not "
                      f"there: {shown}; set config.init_from_partial=True to keep their fresh init")
  if missing:
    logging.warning("init_from %s (init_from_partial): %d parameter arrays keep their fresh init: %s", path,
                    len(missing), ", ".join(missing))
  out = jax.tree_util.tree_map_with_path(
      lambda p, v: new[jax.tree_util.keystr(p)].astype(v.dtype) if jax.tree_util.keystr(p) in new else v, params)
  return out, len(new)
