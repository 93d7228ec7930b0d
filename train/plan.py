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
--json: one object per plan per line. Before compiling it prints the run-plan report
(train/planning/report.py) of each plan, on stderr with --json.

--inference plans inference instead (train/planning/inference.py): the prefill of a
prompt of --seq-len positions and one decode step, compiled for the slice with the
parameters sharded as `inference.load(mesh=)` shards them, or estimated for a GPU
(--gpu 24GB | 80GB | a chip key); per device: weights, KV cache, inputs, temporaries,
total against HBM, fits, decode time at the HBM roofline. The model is --config's or
--ckpt's (a checkpoint directory); --quant int8|int4, --kv-cache int8, --batch rows,
--mesh tensor=4, --new-tokens, --prefill-chunk, --dtype. docs/inference_hardware.md.

  python -m train.plan --inference --config configs/stage3_long_video_7b.py --gpu 24GB --seq-len 11264 --quant int8
  python -m train.plan --inference --ckpt out/ --topology v5e-4 --seq-len 65536

This module is the CLI and the orchestration; the parts live in train/planning/: aot
(topologies, the ahead-of-time compile), buffers (XLA dumps), policy (shapes, mesh),
report (the run-plan report), inference (--inference). Chip figures: llamavid_jax/hardware.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import types

from train.planning import aot

if __name__ == "__main__":
  # Before jax is imported (libtpu and XLA read the environment when jax starts).
  _DUMP = aot.environment(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from train.planning import buffers  # noqa: E402
from train.planning.aot import GIB, Topology, libtpu_name, topology, torus  # noqa: E402,F401
from train.planning.buffers import peak_buffers  # noqa: E402,F401
from train.planning.policy import Shape, choose_mesh, config_shape, is_auto, shape_for  # noqa: E402,F401
from train.planning.report import run_plan_report  # noqa: E402


# --- compile and measure ------------------------------------------------------------------
def _with(c, **kw):
  c = c.copy_and_resolve_references()
  with c.unlocked():
    for k, v in kw.items():
      node = c
      *path, last = k.split(".")
      for p in path:
        node = node[p]
      try:
        node[last] = v
      except TypeError:   # mesh="auto" -> axis sizes: another type
        del node[last]
        node[last] = v
  return c


def setup(c, n: int, seq_len: int | None = None, batch: int | None = None, accum: int | None = None,
          frames: int | None = None) -> types.SimpleNamespace:
  """The policy half of `plan` for `n` devices, nothing compiled: the row (`shape`),
  the global batch and micro-batches (with the rules that chose them), the mesh
  (`sizes`, `mesh_rule`: `choose_mesh`, as `train.train` runs `mesh="auto"`) and the
  config `c` as planned (`config`: those written into it)."""
  from llamavid_jax.models.config import from_dict
  from llamavid_jax.sharding import mesh_sizes
  from train.planning.policy import sequence_sharded

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
  scaled = batch_rule.startswith("the config's ") and batch_rule != "the config's"
  if not is_auto(c.mesh):
    try:   # a scaled batch keeps to the config's mesh where it can
      own = mesh_sizes(dict(c.mesh), n)
      if scaled and batch % (own["data"] * own["fsdp"]):
        rows = own["data"] * own["fsdp"]
        batch, batch_rule = max(rows, batch // rows * rows), batch_rule + f", a multiple of data x fsdp = {rows}"
    except ValueError:
      pass
  sizes, mesh_rule = choose_mesh(c.mesh, n, shape, batch, sequence_sharded(model_cfg))
  rows = sizes["data"] * sizes["fsdp"]
  if batch % rows and scaled:
    batch = max(rows, batch // rows * rows)
    batch_rule += f", a multiple of data x fsdp = {rows}"
  if batch % rows:
    raise ValueError(f"global batch {batch} does not split over data x fsdp = {rows}: pass --batch")
  accum_rule = "--accum" if accum else "one row per batch shard"
  accum = accum or batch // rows
  planned = _with(c, batch_size=batch, accum_steps=accum, mesh=sizes, **{
      "data.text_len": shape.text_len, "data.num_frames": shape.frames,
      "data.buckets": ((shape.text_len, shape.frames, shape.prompts),),
      "data.max_len": max(shape.seq_len, c.data.get("max_len", 0)), "data.max_frames": shape.frames,
      "model.llm.max_positions": max(shape.seq_len, model_cfg.llm.max_positions)})
  return types.SimpleNamespace(config=planned, model_cfg=model_cfg, shape=shape, batch=batch, batch_rule=batch_rule,
                               accum=accum, accum_rule=accum_rule, sizes=sizes, mesh_rule=mesh_rule)


def plan(c, topo: Topology, seq_len: int | None = None, batch: int | None = None,
         accum: int | None = None, dump_dir: str | None = None, top: int = 12, frames: int | None = None,
         report=sys.stdout) -> dict:
  """Compiles config `c`'s train step for `topo` with abstract shapes -> the plan (a
  dict: see `json_record`). `seq_len`: plan rows of that many LLM positions (else
  the config's longest bucket); `batch`: global batch (default: the config's, scaled
  to keep its tokens per step); `accum`: micro-batches (default: one row per batch
  shard); `dump_dir`: XLA's dump directory, for the buffers live at the peak; `frames`:
  frames per row (`shape_for`); `report`: where the run-plan report is printed before
  compiling (None: nowhere)."""
  from flax import linen as nn
  from llamavid_jax import sharding
  from llamavid_jax.models import LlamaVid
  from llamavid_jax.models.config import from_dict
  from train import metrics, optim, step as S
  from train.train import build, input_placement

  n = len(topo.devices)
  p = setup(c, n, seq_len, batch, accum, frames)
  c, shape, batch, accum, sizes = p.config, p.shape, p.batch, p.accum, p.sizes
  spec = p.model_cfg.input_spec
  mesh = sharding.make_mesh(sizes, list(topo.devices))
  if report is not None:
    print("\n".join(run_plan_report(c, mesh, p.mesh_rule)), file=report, flush=True)
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
  mem, oom, secs = aot.compile_step(trainer, state, abstract_batch, mesh)
  trains = {t: any(l == optim.TRAINABLE for l in jax.tree.leaves(b.labels[t])) for t in b.labels}
  flops = metrics.flops_per_step(b.model_cfg, batch, shape.text_len, shape.frames, d.qformer_len,
                                 d.use_features, trains, num_prompts=shape.prompts)
  if mem is not None:
    sizes_, device, host = aot.memory_figures(mem)
  else:
    sizes_, device, host = buffers.oom_sizes(oom, abstract_batch, state, dump_dir)
  fits = oom is None and device <= topo.hbm_bytes and (topo.host_bytes is None or host <= topo.host_bytes)
  step = 2 * flops / (n * topo.peak_flops) if topo.peak_flops else None
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(b.abstract)["params"]))
  out = dict(topology=topo.name, libtpu_topology=topo.libtpu, devices=n, chips=topo.chips,
             device_kind=topo.device_kind, seq_len=shape.seq_len, text_len=shape.text_len,
             num_frames=shape.frames, prompts=shape.prompts, tokens_per_frame=spec.tokens_per_frame,
             batch=batch, batch_rule=p.batch_rule, accum_steps=accum, accum_rule=p.accum_rule, mesh=sizes,
             params=n_params, per_chip_bytes=int(device), hbm_bytes=int(topo.hbm_bytes),
             **{k: int(v) for k, v in sizes_.items()}, host_bytes=int(host), host_limit_bytes=topo.host_bytes,
             fits=bool(fits), compile_error=oom,
             flops_per_step=flops, flops_per_chip=flops / n, step_seconds_at_50_mfu=step,
             compile_seconds=round(secs, 1), shape_rule=shape.rule, mesh_rule=p.mesh_rule,
             remat_policy=b.model_cfg.remat_policy, attention_impl=b.model_cfg.attention_impl,
             dtype=b.model_cfg.dtype, param_dtype=b.model_cfg.param_dtype)
  out["peak_live_bytes"] = buffers.dumped_peak(dump_dir) if dump_dir else None
  out["peak_buffers"] = peak_buffers(dump_dir, top) if dump_dir else []
  if dump_dir:
    buffers.clear(dump_dir)
  return out


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


def inference_main(f) -> None:
  """--inference: the prefill and decode plan of each --seq-len (train/planning/inference.py)."""
  from llamavid_jax.models.config import from_dict
  from train.planning import inference as I
  c = _CONFIG.value if f["config"].present else None
  if (c is None) == (f.ckpt is None):
    raise ValueError("--inference: give exactly one of --config (a training config) and --ckpt (a checkpoint directory)")
  if c is not None:
    model_cfg, name = from_dict(c.model), f["config"].config_filename
  else:
    from llamavid_jax.checkpoint import orbax_io
    model_cfg, name = orbax_io.load_model_config(f.ckpt), f.ckpt
  mesh = None
  if f.mesh:
    try:
      mesh = {k: int(v) for k, v in (kv.split("=") for kv in f.mesh.split(","))}
    except ValueError:
      raise ValueError(f"--mesh {f.mesh!r}: expected axis=size pairs, e.g. tensor=4 or tensor=2,sequence=2") from None
  tgt = I.target(f.topology, f.gpu)
  seq_lens = [int(s) for s in f["seq-len"].value.split(",")] if f["seq-len"].value else [None]
  plans = []
  for s in seq_lens:
    row = I.prompt_row(model_cfg, s, c, f.frames)
    p = I.plan_inference(model_cfg, tgt, row, rows=f.batch or 1, new_tokens=f["new-tokens"].value, quant=f.quant,
                         kv_cache=f["kv-cache"].value, mesh=mesh, prefill_chunk=f["prefill-chunk"].value,
                         features=(c is not None and bool(c.data.get("use_features"))) or model_cfg.movie,
                         dtype=f.dtype)
    plans.append(p)
    print(json_record(p) if f.json else I.describe(p, name), flush=True)
    if not f.json and len(seq_lens) > 1:
      print()
  if len(plans) > 1 and not f.json:
    print(f"{name}: inference on {tgt.describe}")
    print(I.table(plans))


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  if f.inference:
    inference_main(f)
    if _DUMP:
      shutil.rmtree(_DUMP, ignore_errors=True)
    return
  if not f["config"].present:
    raise ValueError("--config: required (the training config to plan)")
  c = _CONFIG.value
  from train.train import check_config
  check_config(c, planned=True)   # the mesh and the batch are the plan's to choose
  topo = topology(f.topology)
  seq_lens = [int(s) for s in f["seq-len"].value.split(",")] if f["seq-len"].value else [None]
  plans = []
  for s in seq_lens:
    p = plan(c, topo, s, f.batch, f.accum, _DUMP, frames=f.frames, report=sys.stderr if f.json else sys.stdout)
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
  flags.DEFINE_bool("inference", False, "plan inference: prefill of --seq-len positions and a decode step")
  flags.DEFINE_string("ckpt", None, "--inference: a checkpoint directory's model instead of --config's")
  flags.DEFINE_string("gpu", None, "--inference: a GPU target (24GB, 80GB, h100-80g, rtx-4090, ...): an estimate")
  flags.DEFINE_string("quant", None, "--inference: int8 | int4 LLM weights (llamavid_jax/quant.py)")
  flags.DEFINE_string("kv-cache", None, "--inference: int8 KV cache (counted from shapes); default the compute dtype")
  flags.DEFINE_string("mesh", None, "--inference: axis sizes, e.g. tensor=4 (default: tensor over the heads)")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "--inference: weights and compute (inference.load's)")
  flags.DEFINE_integer("new-tokens", 512, "--inference: answer tokens the cache has room for")
  flags.DEFINE_integer("prefill-chunk", 0, "--inference: prefill C positions at a time (generate's prefill_chunk)")
  from llamavid_jax.cli import parse_flags, run
  run(lambda: app.run(main, flags_parser=parse_flags))
