"""Thin wrapper over `orbax.checkpoint.CheckpointManager`.

One checkpoint = `state` (step, params, optimizer state; sharded arrays, written
asynchronously by every process) + `data` (the data iterator's position, one JSON file
per process through grain's orbax handler). Saves every `every` steps, keeps `keep`.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
import grain


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
  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True,
               min_replica_slice_bytes: int = 1 << 20):
    _array_handler(min_replica_slice_bytes)
    self.directory = os.path.abspath(directory)
    self.mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                             enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save without `force`."""
    return step not in self.mngr.all_steps() and self.mngr.should_save(step)

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started."""
    if step in self.mngr.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(_data_item(data_iter)))
    return self.mngr.save(step, args=args, force=force)

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """abstract_state: jax.ShapeDtypeStruct tree with shardings -> state; the data
    iterator is set in place."""
    step = self.latest_step() if step is None else step
    out = self.mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(_data_item(data_iter))))
    return out["state"]

  def wait(self):
    self.mngr.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any got the preemption notice (multi-process runs
    with jax.distributed's preemption service); False otherwise."""
    return jax.process_count() > 1 and self.mngr.reached_preemption(step)

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def abstract_like(shardings, shapes):
  """ShapeDtypeStructs with shardings for restore, from a shape tree and a sharding tree."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def load_init_params(path: str, params, mesh, model_cfg):
  """`params` (initialised, sharded) with every leaf found at `path` replaced by the
  stored one: `path` is a converted checkpoint (llamavid_jax.checkpoint.orbax_io
  layout, possibly partial: e.g. Vicuna + EVA-ViT-g + Q-Former, projectors new) or a
  previous stage's `checkpoints/` directory (its latest step's parameters).
  -> (params, number of leaves loaded)."""
  path = os.path.abspath(path)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if os.path.exists(os.path.join(path, "model_config.json")):
    from llamavid_jax.checkpoint import orbax_io
    loaded = orbax_io.restore(path, mesh, cfg=model_cfg)
  else:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    with ocp.CheckpointManager(path) as m:
      step = m.latest_step()
      if step is None:
        raise FileNotFoundError(f"init_from={path}: no checkpoint there")
      item = {"params": target}
      loaded = m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)))["state"]["params"]
  new = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  for k, v in new.items():
    if k not in flat:
      raise ValueError(f"init_from={path}: {k} is not a parameter of this model")
    if v.shape != flat[k].shape:
      raise ValueError(f"init_from={path}: {k} has shape {v.shape}, the model {flat[k].shape}")
  out = jax.tree_util.tree_map_with_path(
      lambda p, v: new[jax.tree_util.keystr(p)].astype(v.dtype) if jax.tree_util.keystr(p) in new else v, params)
  return out, len(new)
