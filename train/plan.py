"""Plans a training step's memory, FLOPs and step time on a TPU slice without a TPU:
the real train step (`train.train.build`, train/step.py) compiled ahead of time with
abstract shapes (no weights allocated) against libtpu's description of the slice
(the `tpu` extra installs libtpu; nothing is run).

  python -m train.plan --config configs/stage3_long_video_7b.py --topology v5p-8
  python -m train.plan --config configs/stage3_long_video_7b.py:size=13b --topology v5p-8 --seq-len 65536
  python -m train.plan --config configs/stage3_long_video_7b.py --topology v5p-8 \
      --seq-len 65536,262144,1048576 --json [--config.KEY=V ...]
  python -m train.plan --config configs/demo.py:toy,tiny --topology cpu:8      (no libtpu needed)

--topology: a slice as Cloud TPU names it (v4-N and v5p-N count TensorCores, 2 per chip:
v5p-8 is 4 chips; v5e-N / v5litepod-N / v6e-N count chips), a libtpu topology name
("v5p:2x2x1", "v6e:4x4"), or cpu:N (N host devices).

--seq-len N (comma-separated: a sweep, printed as a table): the LLM sequence to plan
for, turned into the config's text length and frames by `shape_for` (printed), with
the global batch scaled to keep the config's LLM tokens per step (--batch overrides).
The mesh is the config's where it fits the devices and the batch, else `choose_mesh`'s
(printed); the micro-batch is one row per batch shard (`--accum` overrides). --frames N
fixes the frames per row instead of the config's share (the text fills the rest): a
movie's 1M positions at the recipe's share are 522K frames, whose features alone are
376 GB; --frames 131072 plans 36 hours of 1-fps video with a long text.

Per chip it prints the compiled step's memory (arguments, temporaries, outputs, total)
against HBM, host memory where inputs or saved activations live there, the model
FLOPs (train/metrics.py: XLA's cost analysis counts a scanned layer once), the step
time at 50 % MFU of the chip's bf16 peak, fits or not, the compile time; where it does
not fit, the buffers live at the peak, largest first (from XLA's buffer assignment).
--json: one object per plan per line.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

# Read by libtpu and XLA when jax initialises: `_environment` sets them first under `python -m`.
# ALLOW_MULTIPLE_LIBTPU_LOAD: nothing runs on a TPU, so a second planner (or a TPU job
# holding libtpu's lockfile) does not block this one.
TPU_ENV = dict(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")
DUMP_MODULES = "train_step"   # the jitted step's HLO module (jit_train_step)


def _argv_value(argv, name: str) -> str | None:
  for i, a in enumerate(argv):
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def _environment(argv) -> str | None:
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


if __name__ == "__main__":
  _DUMP = _environment(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1 << 30


# --- slices ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation as Cloud TPU's pages list it: slice names count TensorCores
  (`cores_per_chip` of them per chip) or chips (1); per chip HBM and bf16 peak; host
  memory per chip (the VM's memory over its chips)."""
  libtpu: str            # libtpu's name prefix ("v5p" in "v5p:2x2x1")
  cores_per_chip: int    # what a slice name's N counts per chip
  dims: int              # torus dimensions
  hbm_gib: float
  peak_tflops: float
  host_gib_per_chip: float


GENERATIONS = {
    "v4": Generation("v4", 2, 3, 32, 275, 407 / 4),
    "v5p": Generation("v5p", 2, 3, 95, 459, 448 / 4),
    "v5e": Generation("v5e", 1, 2, 16, 197, 192 / 4),
    "v5litepod": Generation("v5e", 1, 2, 16, 197, 192 / 4),
    "v6e": Generation("v6e", 1, 2, 32, 918, 720 / 4),
}
# libtpu's device_kind of each generation (v5p is "TPU v5").
KINDS = {"TPU v4": "v4", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
         "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


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
  if gen not in GENERATIONS:
    raise ValueError(f"--topology {name!r}: unknown TPU generation {gen!r}; expected one of {sorted(GENERATIONS)}")
  g = GENERATIONS[gen]
  if n % g.cores_per_chip:
    raise ValueError(f"--topology {name!r}: {gen}-N counts TensorCores, {g.cores_per_chip} per chip")
  shape = torus(n // g.cores_per_chip, g.dims)
  kw = {}
  if math.prod(shape) < 4:   # libtpu's default host is 2x2x1 chips
    kw["chips_per_host_bounds"] = tuple(shape) + (1,) * (3 - len(shape))
  return f"{g.libtpu}:{'x'.join(map(str, shape))}", kw


def _generation(kind: str) -> Generation:
  for k in sorted(KINDS, key=len, reverse=True):
    if kind == k:
      return GENERATIONS[KINDS[k]]
  raise ValueError(f"device kind {kind!r}: no HBM / peak figures for it (known: {sorted(KINDS)})")


def topology(name: str) -> Topology:
  """Devices and per-device figures of `name` (see the module docstring)."""
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
  g = _generation(devices[0].device_kind)
  chips = len({tuple(d.coords) for d in devices})
  per_chip = len(devices) // chips   # v4's compile-only devices are its two TensorCores
  return Topology(name, tuple(devices), tname, chips, int(g.hbm_gib * GIB / per_chip),
                  g.peak_tflops * 1e12 / per_chip, int(g.host_gib_per_chip * GIB / per_chip))


# --- the shapes to plan -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
  """One LLM row: `text_len` text positions, `frames` frame slots, `prompts` placeholder
  slots -> `seq_len` spliced LLM positions."""
  seq_len: int
  text_len: int
  frames: int
  prompts: int
  rule: str


def config_shape(c, spec) -> Shape:
  """The config's longest bucket (as train.train reports MFU for)."""
  from llamavid_jax.data.buckets import as_buckets, llm_length
  d = c.data
  b = max(as_buckets(d.get("buckets") or ((d.text_len, d.num_frames),)), key=lambda b: llm_length(b, spec))
  return Shape(llm_length(b, spec), b.text_len, b.frames, b.prompts, "the config's longest bucket")


def shape_for(seq_len: int, base: Shape, tokens_per_frame: int, frame_multiple: int = 1,
              movie: bool = False, frames: int | None = None) -> Shape:
  """The row of exactly `seq_len` LLM positions closest to the config's `base` row,
  frames rounded down to a multiple of `frame_multiple` (the model's frame_chunk):
  clip: frames T = ((S - text) / P + 1) / tokens_per_frame and the text takes up the
  rest, text = S - P * (T * tokens_per_frame - 1) >= the config's;
  movie (one placeholder per frame, in the text): the config's text besides its
  placeholders (subtitles, prompt: E = text - T) stays, T = (S - E) / tokens_per_frame,
  text = E + T. A config without frames plans text only (text = S). `frames` fixes T
  instead (--frames): the text fills the rest of the row."""
  from llamavid_jax.models.splice import spliced_length
  if not base.frames:
    return Shape(seq_len, seq_len, 0, base.prompts, f"text = S = {seq_len} (no frames)")
  p, k = base.prompts, tokens_per_frame
  fixed = frames is not None
  if fixed:
    if frames % frame_multiple:
      raise ValueError(f"--frames {frames}: not a multiple of the model's frame_chunk {frame_multiple}")
    if seq_len - (frames * k if movie else p * (frames * k - 1)) < 1:
      raise ValueError(f"--frames {frames}: {frames} x {k} tokens leave no text in {seq_len} positions")
  elif movie:
    extra = base.text_len - base.frames
    frames = (seq_len - extra) // k
  else:
    frames = int(((seq_len - base.text_len) / p + 1) // k)
  frames -= frames % frame_multiple
  if frames <= 0:
    raise ValueError(f"--seq-len {seq_len}: shorter than the config's {base.text_len} text positions + one "
                     f"frame chunk ({frame_multiple} x {k} tokens)")
  if movie:
    text = seq_len - frames * (k - 1)
    assert spliced_length(text, frames, k, movie=True) == seq_len
    rule = ("movie: frames = --frames" if fixed else
            f"movie: frames = (S - {extra} other text) / {k} tokens per frame"
            + (f", a multiple of frame_chunk {frame_multiple}" if frame_multiple > 1 else ""))
    rule += f"; text = S - frames x {k - 1} (a placeholder a frame + the rest)"
    return Shape(seq_len, text, frames, p, rule)
  text = seq_len - p * (frames * k - 1)
  assert spliced_length(text, frames, k, p) == seq_len
  rule = ("frames = --frames" if fixed else f"frames = ((S - text {base.text_len}) / P {p} + 1) / {k} tokens per frame"
          + (f", a multiple of frame_chunk {frame_multiple}" if frame_multiple > 1 else ""))
  rule += f"; text = S - P x (frames x {k} - 1)"
  return Shape(seq_len, text, frames, p, rule)


def choose_mesh(config_mesh: dict, n: int, shape: Shape, batch: int, sequence_sharded: bool,
                min_local: int = 8192) -> tuple[dict[str, int], str]:
  """-> (axis sizes, why). The config's mesh where it fits `n` devices and `batch` rows,
  else: with a sequence-sharded attention (ring), `sequence` = the most devices that
  still hold >= `min_local` positions each (ring steps stay compute-bound) and divide
  the row, `fsdp` the rest; otherwise fsdp over all devices."""
  from llamavid_jax.sharding import mesh_sizes
  try:
    sizes = mesh_sizes(dict(config_mesh), n)
    if batch % (sizes["data"] * sizes["fsdp"]) == 0:
      return sizes, "the config's"
    why = f"the config's {dict(config_mesh)} needs a batch that splits over data x fsdp"
  except ValueError as e:
    why = f"the config's {dict(config_mesh)} does not fit: {e}"
  tensor = int(config_mesh.get("tensor", 1)) if n % max(int(config_mesh.get("tensor", 1)), 1) == 0 else 1
  rest = n // tensor
  seq = 1
  if sequence_sharded:
    divisors = [d for d in range(1, rest + 1) if rest % d == 0 and shape.seq_len % d == 0
                and (shape.seq_len // d >= min_local or d == 1)]
    fit = [d for d in divisors if batch % (rest // d) == 0]
    seq = max(fit or divisors)
  sizes = dict(data=1, fsdp=rest // seq, tensor=tensor, sequence=seq)
  rule = (f"sequence over the most devices keeping >= {min_local} positions each, fsdp the rest"
          if sequence_sharded else "fsdp over all devices")
  return sizes, f"{why}; chose {rule}"


# --- compile and measure ------------------------------------------------------------------
def _with(c, **kw):
  c = c.copy_and_resolve_references()
  with c.unlocked():
    for k, v in kw.items():
      node = c
      *path, last = k.split(".")
      for p in path:
        node = node[p]
      node[last] = v
  return c


def plan(c, topo: Topology, seq_len: int | None = None, batch: int | None = None,
         accum: int | None = None, dump_dir: str | None = None, top: int = 12, frames: int | None = None) -> dict:
  """Compiles config `c`'s train step for `topo` with abstract shapes -> the plan (a
  dict: see `json_record`). `seq_len`: plan rows of that many LLM positions (else
  the config's longest bucket); `batch`: global batch (default: the config's, scaled
  to keep its tokens per step); `accum`: micro-batches (default: one row per batch
  shard); `dump_dir`: XLA's dump directory, for the buffers live at the peak; `frames`:
  frames per row (`shape_for`)."""
  from flax import linen as nn
  from llamavid_jax import sharding
  from llamavid_jax.models import LlamaVid
  from llamavid_jax.models.config import from_dict
  from train import metrics, optim, step as S
  from llamavid_jax.ops import attention
  from llamavid_jax.sharding import mesh_sizes
  from train.train import build, input_placement

  model_cfg = from_dict(c.model)
  spec = model_cfg.input_spec
  base = config_shape(c, spec)
  if frames is not None and seq_len is None:
    seq_len = base.seq_len
  shape = base if seq_len is None else shape_for(seq_len, base, spec.tokens_per_frame, model_cfg.frame_chunk or 1,
                                                         movie=model_cfg.movie, frames=frames)
  if batch is not None:
    batch_rule = "--batch"
  elif seq_len is None or shape.seq_len == base.seq_len:
    batch, batch_rule = c.batch_size, "the config's"
  else:
    batch = max(1, c.batch_size * base.seq_len // shape.seq_len)
    batch_rule = f"the config's {c.batch_size} x {base.seq_len} LLM positions per step kept (at least 1 row)"
  n = len(topo.devices)
  scaled = batch_rule.startswith("the config's ") and batch_rule != "the config's"
  try:   # a scaled batch keeps to the config's mesh where it can
    own = mesh_sizes(dict(c.mesh), n)
    if scaled and batch % (own["data"] * own["fsdp"]):
      rows = own["data"] * own["fsdp"]
      batch, batch_rule = max(rows, batch // rows * rows), batch_rule + f", a multiple of data x fsdp = {rows}"
  except ValueError:
    pass
  sizes, mesh_why = choose_mesh(c.mesh, n, shape, batch, model_cfg.attention_impl in attention.RING_IMPLS)
  rows = sizes["data"] * sizes["fsdp"]
  if batch % rows and scaled:
    batch = max(rows, batch // rows * rows)
    batch_rule += f", a multiple of data x fsdp = {rows}"
  if batch % rows:
    raise ValueError(f"global batch {batch} does not split over data x fsdp = {rows}: pass --batch")
  accum_rule = "--accum" if accum else "one row per batch shard"
  accum = accum or batch // rows
  c = _with(c, batch_size=batch, accum_steps=accum, mesh=sizes, **{
      "data.text_len": shape.text_len, "data.num_frames": shape.frames,
      "data.buckets": ((shape.text_len, shape.frames, shape.prompts),),
      "data.max_len": max(shape.seq_len, c.data.get("max_len", 0)), "data.max_frames": shape.frames,
      "model.llm.max_positions": max(shape.seq_len, model_cfg.llm.max_positions)})
  mesh = sharding.make_mesh(sizes, list(topo.devices))
  d = c.data
  small = _with(c, **{"data.text_len": 8, "data.num_frames": 1, "data.buckets": ((8, 1, 1),),
                      "model.frame_chunk": 0})   # parameter shapes do not depend on the row
  b = build(small, mesh)
  trainer = S.Trainer(LlamaVid(from_dict(c.model)), b.tx, b.schedule, b.labels, mesh, b.shardings, accum,
                      **input_placement(d))
  abstract_batch = trainer.abstract_batch(b.model_cfg, batch, shape.text_len, shape.frames, d.qformer_len,
                                          d.use_features, shape.prompts)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       nn.unbox(b.abstract), b.shardings)
  t0 = time.perf_counter()
  oom = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    lowered = trainer.jitted(abstract_batch).lower(state, abstract_batch)
    try:
      mem = lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:   # XLA refuses a program over HBM: plan it all the same
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      oom, mem = str(e).split("\n")[0], None
  secs = time.perf_counter() - t0
  trains = {t: any(l == optim.TRAINABLE for l in jax.tree.leaves(b.labels[t])) for t in b.labels}
  flops = metrics.flops_per_step(b.model_cfg, batch, shape.text_len, shape.frames, d.qformer_len,
                                 d.use_features, trains, num_prompts=shape.prompts)
  if mem is not None:
    sizes_ = dict(argument_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                  output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes)
    device = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
              - mem.alias_size_in_bytes)
    host = (mem.host_argument_size_in_bytes + mem.host_temp_size_in_bytes + mem.host_output_size_in_bytes
            - mem.host_alias_size_in_bytes)
  else:
    sizes_, device, host = _oom_sizes(oom, abstract_batch, state, dump_dir)
  fits = oom is None and device <= topo.hbm_bytes and (topo.host_bytes is None or host <= topo.host_bytes)
  step = 2 * flops / (n * topo.peak_flops) if topo.peak_flops else None
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(b.abstract)["params"]))
  out = dict(topology=topo.name, libtpu_topology=topo.libtpu, devices=n, chips=topo.chips,
             device_kind=topo.device_kind, seq_len=shape.seq_len, text_len=shape.text_len,
             num_frames=shape.frames, prompts=shape.prompts, tokens_per_frame=spec.tokens_per_frame,
             batch=batch, batch_rule=batch_rule, accum_steps=accum, accum_rule=accum_rule, mesh=sizes,
             params=n_params, per_chip_bytes=int(device), hbm_bytes=int(topo.hbm_bytes),
             **{k: int(v) for k, v in sizes_.items()}, host_bytes=int(host), host_limit_bytes=topo.host_bytes,
             fits=bool(fits), compile_error=oom,
             flops_per_step=flops, flops_per_chip=flops / n, step_seconds_at_50_mfu=step,
             compile_seconds=round(secs, 1), shape_rule=shape.rule, mesh_rule=mesh_why,
             remat_policy=model_cfg.remat_policy, attention_impl=model_cfg.attention_impl,
             dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
  out["peak_live_bytes"] = _dumped_peak(dump_dir) if dump_dir else None
  out["peak_buffers"] = peak_buffers(dump_dir, top) if dump_dir else []
  if dump_dir:
    for f in glob.glob(os.path.join(dump_dir, "*")):   # the next plan's files only
      shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
  return out


def _bytes(tree, host: bool) -> int:
  """Bytes per device of a tree of sharded ShapeDtypeStructs in host (or device) memory."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if host == bool(x.sharding.memory_kind and "host" in x.sharding.memory_kind))


def _oom_sizes(message: str, batch, state, dump_dir: str | None) -> tuple[dict, int, int]:
  """Per-device sizes of a step XLA refused (over HBM): arguments from the shardings,
  outputs = the donated state (aliased), temporaries from the error's figure ("HLO
  temporaries (314.90G)") or, failing that, the dumped peak. -> (sizes, total, host)."""
  args = _bytes(state, False) + _bytes(batch, False)
  out = _bytes(state, False)
  m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
  if m:
    temp = float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)
  else:
    temp = max((_dumped_peak(dump_dir) or 0) - args, 0) if dump_dir else 0
  sizes = dict(argument_bytes=args, temp_bytes=temp, output_bytes=out, alias_bytes=out)
  return sizes, int(args + temp), _bytes(batch, True)


# --- what takes the memory ------------------------------------------------------------
_LIVE = re.compile(r"^\s+(\S+?)(\{[\d,]*\})?: (\d+) bytes")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) [\w-]+\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _live_range_file(dump_dir: str) -> str | None:
  files = sorted(glob.glob(os.path.join(dump_dir, f"*{DUMP_MODULES}*after_optimizations-live-range.txt")))
  return files[-1] if files else None


def _dumped_peak(dump_dir: str) -> int | None:
  """The bytes live at the step's peak, as XLA's live-range dump sums them."""
  path = _live_range_file(dump_dir)
  if path:
    with open(path) as f:
      m = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", f.read())
    if m:
      return int(m.group(1).replace(" ", ""))
  return None


def _element(shape: str, index: str) -> str:
  """The element at ShapeIndex `index` ("{1}", "{0,2}", "") of an HLO shape string."""
  for i in (int(x) for x in index.strip("{}").split(",") if x):
    if not shape.startswith("("):
      return shape
    parts, depth, start = [], 0, 1
    for j, ch in enumerate(shape):
      depth += ch in "([{" and 1 or ch in ")]}" and -1 or 0
      if (ch == "," and depth == 1) or j == len(shape) - 1:
        parts.append(shape[start:j].strip())
        start = j + 1
    shape = parts[i] if i < len(parts) else shape
  return shape


def peak_buffers(dump_dir: str, top: int = 12) -> list[dict]:
  """The buffers live at the step's memory peak, largest first: [{bytes, name, shape,
  memory, op}] from XLA's dumped live ranges (`*-live-range.txt`) and optimized HLO
  (shapes, the memory space: "host" for layouts in S(5), and the jax op that made each:
  `op_name` metadata). [] where XLA dumped none."""
  path = _live_range_file(dump_dir)
  if not path:
    return []
  live, on = [], False
  with open(path) as f:
    for line in f:
      if "(peak):" in line:
        on = True
        continue
      if on:
        m = _LIVE.match(line)
        if not m:
          break
        live.append((int(m.group(3)), m.group(1), m.group(2) or ""))
  live.sort(reverse=True)
  wanted = {name for _, name, _ in live}
  info = {}
  hlo = path.replace("-live-range.txt", ".txt")
  if os.path.exists(hlo):
    with open(hlo) as f:
      for line in f:
        m = _INSTR.match(line)
        if m and m.group(1) in wanted:
          op = _OP_NAME.search(line)
          info[m.group(1)] = (m.group(2), op.group(1) if op else "")
  out = []
  for size, name, idx in live:
    shape, op = info.get(name, ("", ""))
    shape = _element(shape, idx)
    out.append(dict(bytes=size, name=name + idx, shape=re.sub(r"\{[^}]*\}", "", shape)[:120],
                    memory="host" if "S(5)" in shape else "device", op=op))
  device = [b for b in out if b["memory"] == "device"]
  return device[:top] + [b for b in out if b["memory"] == "host"][:max(top // 4, 1)]


# --- output -------------------------------------------------------------------------------
def _gib(x) -> str:
  return f"{x / GIB:.2f}"


def _flops(x) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if x >= scale:
      return f"{x / scale:.1f} {unit}"
  return f"{x / 1e6:.1f} MFLOP"


def _size(x) -> str:
  return f"{x / GIB:.2f} GiB" if x >= GIB / 10 else f"{x / (1 << 20):.1f} MiB"


def json_record(p: dict) -> str:
  return json.dumps(p)


def describe(p: dict, topo: Topology, config_name: str) -> str:
  """The human-readable plan of one `plan()` result."""
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  lines = [
      f"{config_name} on {topo.describe()}",
      f"sequence {p['seq_len']} = text {p['text_len']} + {p['prompts']} x ({p['num_frames']} frames x "
      f"{p['tokens_per_frame']} - 1)  [{p['shape_rule']}]",
      f"batch {p['batch']} [{p['batch_rule']}] in {p['accum_steps']} micro-batch(es) [{p['accum_rule']}]; "
      f"mesh {mesh} [{p['mesh_rule']}]",
      f"{p['params'] / 1e9:.2f} B params ({p['param_dtype']}), compute {p['dtype']}, attention {p['attention_impl']}, "
      f"remat {p['remat_policy']}",
      f"per chip: arguments {_size(p['argument_bytes'])}, temporaries {_size(p['temp_bytes'])}, outputs "
      f"{_size(p['output_bytes'])}, aliased {_size(p['alias_bytes'])} -> {_size(p['per_chip_bytes'])} "
      f"of {_size(p['hbm_bytes'])}" + (f"; host {_size(p['host_bytes'])}" + (
          f" of {_size(p['host_limit_bytes'])}" if p["host_limit_bytes"] else "") if p["host_bytes"] else ""),
      f"fits: {'yes' if p['fits'] else 'NO'}" + (f" ({p['compile_error']})" if p["compile_error"] else ""),
      f"model FLOPs per step {_flops(p['flops_per_step'])} ({_flops(p['flops_per_chip'])} per chip)"
      + (f"; step at 50% MFU {p['step_seconds_at_50_mfu']:.2f} s" if p["step_seconds_at_50_mfu"] else ""),
      f"compiled in {p['compile_seconds']:.1f} s",
  ]
  if not p["fits"] and p["peak_buffers"]:
    lines.append("largest buffers live at the peak (HBM, then host memory):")
    lines += [f"  {_size(b['bytes']):>10} {b['memory']:>6}  {b['shape']:<40} {b['op'] or b['name']}"
              for b in p["peak_buffers"]]
  return "\n".join(lines)


def table(plans: list[dict]) -> str:
  head = ("seq_len", "frames", "batch", "accum", "mesh d/f/t/s", "GiB/chip", "HBM", "host GiB", "fits",
          "TFLOP/chip", "step@50%", "compile s")
  rows = [head]
  for p in plans:
    m = p["mesh"]
    rows.append((str(p["seq_len"]), str(p["num_frames"]), str(p["batch"]), str(p["accum_steps"]),
                 f"{m['data']}/{m['fsdp']}/{m['tensor']}/{m['sequence']}", _gib(p["per_chip_bytes"]),
                 _gib(p["hbm_bytes"]), _gib(p["host_bytes"]), "yes" if p["fits"] else "NO",
                 f"{p['flops_per_chip'] / 1e12:.1f}",
                 f"{p['step_seconds_at_50_mfu']:.2f} s" if p["step_seconds_at_50_mfu"] else "-",
                 f"{p['compile_seconds']:.0f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  c = _CONFIG.value
  topo = topology(f.topology)
  seq_lens = [int(s) for s in f["seq-len"].value.split(",")] if f["seq-len"].value else [None]
  plans = []
  for s in seq_lens:
    p = plan(c, topo, s, f.batch, f.accum, _DUMP, frames=f.frames)
    plans.append(p)
    print(json_record(p) if f.json else describe(p, topo, f["config"].config_filename), flush=True)
    if not f.json and len(seq_lens) > 1:
      print()
  if len(plans) > 1 and not f.json:
    print(f"{f['config'].config_filename} on {topo.describe()}")
    print(table(plans))
  if _DUMP:
    shutil.rmtree(_DUMP, ignore_errors=True)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "training config file[:arg] (--config.KEY=V overrides)")
  flags.DEFINE_string("topology", "v5p-8", "slice (v5p-8, v5e-16, v6e-8), libtpu name (v5p:2x2x1) or cpu:N")
  flags.DEFINE_string("seq-len", None, "LLM positions per row to plan for; comma-separated for a sweep")
  flags.DEFINE_integer("batch", None, "global batch (default: the config's, scaled to keep its tokens per step)")
  flags.DEFINE_integer("accum", None, "micro-batches per step (default: one row per batch shard)")
  flags.DEFINE_integer("frames", None, "frames per row (default: the config's longest bucket's share, scaled)")
  flags.DEFINE_bool("json", False, "one JSON object per plan per line")
  flags.mark_flag_as_required("config")
  app.run(main)
