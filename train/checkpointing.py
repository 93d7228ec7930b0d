"""Thin wrapper over `orbax.checkpoint.CheckpointManager`.

One checkpoint = `state` (step, params, optimizer state; sharded arrays, written
asynchronously by every process) + `data` (the data iterator's position, one JSON file
per process through grain's orbax handler) + `schedule` (a JSON of the config the
learning-rate schedule depends on, to warn on a resume that changes it). Saves every
`every` steps, keeps `keep`.

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
import orbax.checkpoint as ocp
import grain
from absl import logging

from llamavid_jax.checkpoint import layout


class IteratorState:
  """Adapts any iterator with `get_state()/set_state()` (dict or bytes) to grain's
  orbax handler, which stores non-grain iterators' states as bytes."""

  def __init__(self, it):
    self.it = it

  def get_state(self) -> bytes:
    s = self.it.get_state()
    return s if isinstance(s, bytes) else json.dumps(s).encode()

  def set_state(self, s: bytes):
    try:
      self.it.set_state(json.loads(s.decode()))
    except (json.JSONDecodeError, UnicodeDecodeError):
      self.it.set_state(s)

  def start_prefetch(self):
    if hasattr(self.it, "start_prefetch"):
      self.it.start_prefetch()


def _data_item(it):
  return it if isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator)) else IteratorState(it)


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
    items = {layout.STATE: ocp.args.StandardSave(state), "data": grain.checkpoint.CheckpointSave(_data_item(data_iter))}
    if self._schedule is not None:
      items["schedule"] = ocp.args.JsonSave(self._schedule)
    with self._failure(step):
      started = self.mngr.save(step, args=ocp.args.Composite(**items), force=force)
    self._saving = step if started else None
    return started

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """abstract_state: jax.ShapeDtypeStruct tree with shardings -> state; the data
    iterator is set in place."""
    step = self.latest_step() if step is None else step
    out = self.mngr.restore(step, args=ocp.args.Composite(**{
        layout.STATE: ocp.args.StandardRestore(abstract_state),
        "data": grain.checkpoint.CheckpointRestore(_data_item(data_iter))}))
    return out[layout.STATE]

  def schedule(self, step: int | None = None) -> dict | None:
    """The `schedule` dict saved with `step` (default: the latest); None if it has none."""
    step = self.latest_step() if step is None else step
    if not os.path.isdir(os.path.join(self.directory, str(step), "schedule")):
      return None
    return dict(self.mngr.restore(step, args=ocp.args.Composite(schedule=ocp.args.JsonRestore()))["schedule"])

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
