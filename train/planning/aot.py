"""Compiling a training step for a TPU slice without a TPU: libtpu's compile-only
devices (`topology`: "v5p-8", "v5e-16", "v5p:2x2x1", or cpu:N host devices), the
environment libtpu and XLA read when jax starts (`environment`), and the
ahead-of-time compile with XLA's memory analysis (`compile_step`). Chip figures
(HBM, peak, host memory) come from llamavid_jax/hardware.py.

jax is imported inside the functions: `environment` must run before jax starts."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time

from llamavid_jax import hardware

# Read by libtpu and XLA when jax initialises: `environment` sets them first under `python -m`.
# ALLOW_MULTIPLE_LIBTPU_LOAD: nothing runs on a TPU, so a second planner (or a TPU job
# holding libtpu's lockfile) does not block this one.
TPU_ENV = dict(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")
DUMP_MODULES = "train_step"   # the jitted step's HLO module (jit_train_step)
GIB = hardware.GIB


def _argv_value(argv, name: str) -> str | None:
  for i, a in enumerate(argv):
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def environment(argv) -> str | None:
  """Before jax is imported: the host compiles (JAX_PLATFORMS=cpu), libtpu is told it
  is not on a TPU VM (else it waits for the metadata server), cpu:N gets N host
  devices, and XLA dumps the step's buffer assignment to a temporary directory (the
  largest buffers). -> that directory."""
  topology = _argv_value(argv, "topology") or ""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  for k, v in TPU_ENV.items():
    os.environ.setdefault(k, v)
  if re.fullmatch(r"v\w+-\d+", topology):
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology)
  xla = os.environ.get("XLA_FLAGS", "")
  if topology.startswith("cpu:") and "xla_force_host_platform_device_count" not in xla:
    xla += f" --xla_force_host_platform_device_count={int(topology[4:])}"
  dump = None
  if "xla_dump_to" not in xla and not topology.startswith("cpu:"):   # CPU would dump its LLVM IR too
    dump = tempfile.mkdtemp(prefix="plan_hlo_")
    xla += f" --xla_dump_to={dump} --xla_dump_hlo_module_re={DUMP_MODULES}"
  os.environ["XLA_FLAGS"] = xla.strip()
  return dump


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                    # as given
  devices: tuple               # jax devices (compile-only for TPU)
  libtpu: str | None           # "v5p:2x2x1"; None for cpu:N
  chips: int
  hbm_bytes: int               # per device
  peak_flops: float | None     # per device, bf16
  host_bytes: int | None       # host memory per device

  @property
  def device_kind(self) -> str:
    return self.devices[0].device_kind

  def describe(self) -> str:
    per = f", {self.hbm_bytes / GIB:.0f} GiB HBM each" if self.libtpu else ""
    where = f" ({self.libtpu})" if self.libtpu and self.libtpu != self.name else ""
    chips = f", {self.chips} chips" if self.chips != len(self.devices) else ""
    return f"{self.name}{where}: {len(self.devices)} x {self.device_kind}{chips}{per}"


def torus(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's slice shape of `chips` (a power of two): 3-D from 2x2x1 by doubling the
  shortest side, the last of equals (v5p-128 = 64 chips -> 4x4x4, 128 -> 4x4x8); 2-D
  likewise (v5e-8 -> 2x4, v6e-256 -> 16x16)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: only power-of-two slices are named here; pass a libtpu topology "
                     "name instead (e.g. v5p:4x4x12)")
  shape = [1] * dims
  if dims == 3 and chips >= 4:
    shape = [2, 2, 1]
  while math.prod(shape) < chips:
    i = max(j for j in range(dims) if shape[j] == min(shape))
    shape[i] *= 2
  return tuple(shape)


def libtpu_name(name: str) -> tuple[str, dict]:
  """A slice name -> (libtpu topology name, get_topology_desc kwargs):
  "v5p-8" -> "v5p:2x2x1", "v5e-16" -> "v5e:4x4"; libtpu names pass through."""
  m = re.fullmatch(r"(v\w+?)-(\d+)", name)
  if not m:
    if re.fullmatch(r"v\w+:\d+(x\d+)+", name):
      return name, {}
    raise ValueError(f"--topology {name!r}: expected a slice (v5p-8, v4-16, v5e-4, v5litepod-16, v6e-8), "
                     "a libtpu topology name (v5p:2x2x1, v6e:4x4) or cpu:N")
  gen, n = m.group(1), int(m.group(2))
  g = hardware.tpu_generation(gen)
  if g is None:
    raise ValueError(f"--topology {name!r}: unknown TPU generation {gen!r}; expected one of "
                     f"{sorted(hardware.TPU_SLICE_PREFIXES)}")
  if n % g.cores_per_chip:
    raise ValueError(f"--topology {name!r}: {gen}-N counts TensorCores, {g.cores_per_chip} per chip")
  shape = torus(n // g.cores_per_chip, g.torus_dims)
  kw = {}
  if math.prod(shape) < 4:   # libtpu's default host is 2x2x1 chips
    kw["chips_per_host_bounds"] = tuple(shape) + (1,) * (3 - len(shape))
  return f"{g.libtpu}:{'x'.join(map(str, shape))}", kw


def topology(name: str) -> Topology:
  """Devices and per-device figures of `name` (see the module docstring)."""
  import jax
  if name.startswith("cpu:"):
    n = int(name[4:])
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(f"--topology {name}: {len(devices)} CPU devices (set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts)")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Topology(name, tuple(devices[:n]), None, n, ram // n, None, None)
  from jax.experimental import topologies
  for k, v in TPU_ENV.items():   # libtpu reads them when the topology is first asked for
    os.environ.setdefault(k, v)
  tname, kw = libtpu_name(name)
  try:
    devices = topologies.get_topology_desc(topology_name=tname, platform="tpu", **kw).devices
  except Exception as e:   # no libtpu, or a shape it refuses
    raise RuntimeError(f"--topology {name}: libtpu gives no topology {tname!r} ({type(e).__name__}: {e}); "
                       "TPU plans need libtpu (pip install -e '.[tpu]')") from None
  kind = devices[0].device_kind
  g = hardware.for_device_kind(kind)
  if g is None or not g.is_tpu:
    raise ValueError(f"device kind {kind!r}: no HBM / peak figures for it in llamavid_jax/hardware.py")
  chips = len({tuple(d.coords) for d in devices})
  per_chip = len(devices) // chips   # v4's compile-only devices are its two TensorCores
  return Topology(name, tuple(devices), tname, chips, g.hbm_bytes // per_chip,
                  g.peak_bf16_flops / per_chip, g.host_bytes // per_chip)


def compile_step(trainer, state, batch, mesh):
  """Lowers and compiles `trainer`'s step for abstract `state` and `batch` on `mesh`.
  -> (XLA's memory analysis or None, the first line of XLA's over-HBM refusal or None,
  seconds). XLA refuses a program over HBM: it is planned all the same."""
  import jax
  from flax import linen as nn
  from llamavid_jax import sharding
  t0 = time.perf_counter()
  mem = oom = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    lowered = trainer.jitted(batch).lower(state, batch)
    try:
      mem = lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      oom = str(e).split("\n")[0]
  return mem, oom, time.perf_counter() - t0


def memory_figures(mem) -> tuple[dict, int, int]:
  """XLA's memory analysis -> (argument / temp / output / alias bytes, device total, host total)."""
  sizes = dict(argument_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
               output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes)
  device = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
  host = (mem.host_argument_size_in_bytes + mem.host_temp_size_in_bytes + mem.host_output_size_in_bytes
          - mem.host_alias_size_in_bytes)
  return sizes, device, host
