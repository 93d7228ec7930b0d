"""Logical axis names -> mesh axes: the one table, and mesh construction.

Modules name their parameter and activation axes logically (`embed`, `mlp`, ...);
only this file knows the mesh. Flax applies rules in order and never uses a mesh
axis twice in one array (a rule's axes are taken all together or not at all), so an
activation `(batch, length, embed)` shards `batch` over (data, fsdp), `length` over
sequence and leaves `embed` whole, while a parameter `(embed, mlp)` puts `embed` on
fsdp x sequence: parameters, gradients and optimizer moments are split over every
data-like axis (as MaxText's), not replicated over the devices a long sequence is
split across.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),     # LLM sequence (ring attention shards it)
    ("frames", "sequence"),     # long video: frames spread over the sequence axis
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", ("fsdp", "sequence")),   # parameters only: activations already use fsdp on batch
    ("kv", None),               # head dim
    ("layers", None),           # scanned layer axis
)

# Logical axes of each model input (MaxText's `input_data_sharding_logical_axes`): rows
# over `batch`; the frame axis of frame inputs over `frames` (long video), dropped by
# `fit_spec` when it does not divide T. Text stays whole along its length: the LLM
# sequence exists only after the splice. A [B, L] `qformer_*` input takes the first two.
INPUT_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", None), "labels": ("batch", None), "text_mask": ("batch", None),
    "frames": ("batch", "frames", None, None, None),   # [B, T, H, W, 3]
    "features": ("batch", "frames", None, None),       # [B, T, N+1, C]
    "frame_mask": ("batch", "frames"),
    "qformer_ids": ("batch", None, None), "qformer_mask": ("batch", None, None),   # [B, P, L]
    "sample_index": ("batch",),
}


def mesh_sizes(shape: dict[str, int], num_devices: int) -> dict[str, int]:
  """Axis sizes over (data, fsdp, tensor, sequence) for `num_devices`; a size of -1
  takes the remaining devices. Raises ValueError (unknown axis, sizes that do not fit)."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
    raise ValueError("sizes must be positive, with at most one -1")
  known = math.prod(v for v in sizes.values() if v != -1)
  if num_devices % known or (-1 not in sizes.values() and known != num_devices):
    raise ValueError(f"{known} devices do not fit the {num_devices} devices there are")
  return {a: (num_devices // known if v == -1 else v) for a, v in sizes.items()}


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over (data, fsdp, tensor, sequence) (see `mesh_sizes`)."""
  devices = list(devices if devices is not None else jax.devices())
  try:
    sizes = list(mesh_sizes(shape, len(devices)).values())
  except ValueError as e:
    raise ValueError(f"mesh {dict(shape)}: {e}") from None
  try:   # topology-aware order on TPU / GPU; plain order on CPU
    arr = mesh_utils.create_device_mesh(sizes, devices)
  except NotImplementedError:   # a TPU torus that cannot hold this shape
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_RULES) -> P:
  return nn.logical_to_mesh_axes(tuple(names), rules)


def spec_axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, one mesh axis or a tuple of them) as a tuple of axes."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def shards(mesh: Mesh, entry) -> int:
  """The number of devices a PartitionSpec entry splits its dim over."""
  return math.prod(mesh.shape[a] for a in spec_axes(entry))


def mesh_axes(name: str, rules=LOGICAL_RULES) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to: mesh_axes("batch") == ("data", "fsdp")."""
  return spec_axes(logical_to_spec((name,), rules)[0])


def dropped_axes(spec: P, shape: Sequence[int], mesh: Mesh) -> list[tuple[int, tuple[str, ...]]]:
  """[(dim, the mesh axes `fit_spec` drops from it)] for each dim of `shape` that `spec`'s
  axes do not divide."""
  out = []
  for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    names = spec_axes(axes)
    kept = names
    while kept and dim % math.prod(mesh.shape[a] for a in kept):
      kept = kept[:-1]
    if kept != names:
      out.append((i, names[len(kept):]))
  return out


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, strict: bool = False) -> P:
  """Drops the mesh axes of any dim they do not divide, the last first (a 1408-wide
  `embed` on fsdp x sequence = 4 x 32 keeps fsdp; 2 kv heads on tensor=4 are
  replicated). That changes memory: `replicated_leaves` lists where it happens for the
  parameters (a decision in the run's plan), and strict=True raises instead."""
  if strict and (dropped := dropped_axes(spec, shape, mesh)):
    raise ValueError(f"shape {tuple(shape)} with {spec}: " + ", ".join(
        f"dim {i} ({shape[i]}) does not split over {'x'.join(a)}" for i, a in dropped))
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = spec_axes(axes)
    while names and dim % math.prod(mesh.shape[a] for a in names):
      names = names[:-1]
    whole = names == spec_axes(axes)
    out.append(axes if whole else names[0] if len(names) == 1 else names or None)
  return P(*out)


def logical_shards(name: str, size: int) -> int:
  """Devices the active logical rules (else LOGICAL_RULES) and the current mesh
  (`jax.set_mesh`) split a dim of `size` named `name` over (1: no mesh, or not split)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  rules = nn.get_logical_axis_rules() or LOGICAL_RULES
  return shards(mesh, fit_spec(logical_to_spec((name,), rules), (size,), mesh)[0])


def input_spec(key: str, shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES) -> P:
  """PartitionSpec of the model input `key` of global `shape` (see INPUT_AXES)."""
  if key not in INPUT_AXES:
    raise KeyError(f"input {key!r} has no logical axes: expected one of {sorted(INPUT_AXES)}")
  return fit_spec(logical_to_spec(INPUT_AXES[key][:len(shape)], rules), shape, mesh)


def param_shardings(abstract_params, mesh: Mesh, rules=LOGICAL_RULES, strict: bool = False):
  """NamedShardings for a boxed (`nn.Partitioned`) parameter tree, e.g. from
  `jax.eval_shape(model.init, ...)`; works on any pytree of boxed leaves. strict: a leaf
  whose dims its axes do not divide is an error (else it keeps fewer axes: see
  `replicated_leaves`)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)

  def one(leaf):
    if not is_box(leaf):
      return NamedSharding(mesh, P())
    spec = logical_to_spec(leaf.names, rules)
    return NamedSharding(mesh, fit_spec(spec, leaf.value.shape, mesh, strict=strict))

  return jax.tree.map(one, abstract_params, is_leaf=is_box)


def replicated_leaves(abstract_params, mesh: Mesh, rules=LOGICAL_RULES) -> list[str]:
  """One line per boxed parameter leaf that keeps fewer mesh axes than its logical names
  ask for (`fit_spec` drops those that do not divide), e.g. "qformer/.../kernel: dim 1
  (1408) not split over sequence": the decisions `param_shardings` makes silently."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params, is_leaf=is_box):
    if not is_box(leaf):
      continue
    shape = leaf.value.shape
    for i, axes in dropped_axes(logical_to_spec(leaf.names, rules), shape, mesh):
      out.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')}: dim {i} ({shape[i]}) not split over {'x'.join(axes)}")
  return out
