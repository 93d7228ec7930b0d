"""Inference memory plan (`python -m train.plan --inference`): the prefill of a prompt of
N LLM positions and one decode step, compiled ahead of time with abstract shapes for a
TPU slice (libtpu, no TPU needed) or CPU devices, or estimated for a GPU; per device:
weights, KV cache, media inputs, temporaries, the total against HBM, fits or not, and
the decode step time at the HBM roofline.

What is compiled is what runs: `generate`'s jitted prefill (`_prefill`, the prompt into
a cache of N + new-tokens slots) and decode step (`_decode`, one token), on parameters
sharded as `inference.load(mesh=...)` shards them (the training's logical rules), the
media as `Model.media` gives them (float32 features or frames, replicated).

Bytes, per device:
  weights    exact, from the parameter shapes and shardings (every parameter a
             checkpoint holds, the ViT's too); quantized (--quant, llamavid_jax/quant.py):
             Qwix's quantized arrays, shaped abstractly (int8: 1 byte an element + one
             scale per output channel; int4: half a byte + one scale per group of
             `quant.group` inputs), compiled as they run
  KV cache   exact, from the cache's shape and the sharding the compiled prefill gives
             it; --kv-cache int8: int8 k and v + one float32 scale per position and kv
             head each, counted from shapes (the cache is compiled in the compute dtype:
             the model's own int8 cache is not used here)
  inputs     exact: the prompt's media and ids
  temps      XLA's temporaries of the compiled prefill / decode step
  prefill    weights + inputs + cache (its output) + prefill temps
  decode     weights + cache x 2 + decode temps: `generate`'s decode step updates its
             cache in place (donated), but growing the cache (at each doubling of its
             room) copies it, so the old and the new cache are live together; the last
             doubling's old cache holds the prompt's slots and half the answer's, about
             a whole cache for a long prompt (counted as one)
  total      the larger of prefill and decode

Decode time at the roofline: a token reads the LLM's weights (not the embedding table:
a lookup) and the whole cache once: (LLM weight bytes + cache bytes) per device / the
device's HBM bandwidth (llamavid_jax/hardware.py).

GPU targets (--gpu 24GB | 80GB | a chip key, or --topology gpu-24g / h100-80g): no GPU
compiler runs here, so the plan is an ESTIMATE: the exact bytes above with temporaries
from a compile of the same prefill and decode with ONE LLM layer (a scanned stack's
temporaries are one layer's working set on an accelerator) by the TPU compiler where
libtpu is installed, else by the CPU compiler (which over-counts: it holds f32 copies
of bf16 weights). The same one-layer compile stands in on a TPU slice whose compiler
refuses the full program for being over HBM (said in the plan).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from llamavid_jax import hardware

GIB = hardware.GIB
KV_CACHES = ("int8",)
KV_SCALE_BYTES = 4          # --kv-cache int8: one float32 scale per position, kv head, k and v
QFORMER_LEN = 64            # a question's Q-Former instruction, bucketed (generate.batch_requests)
PROXY_TPU = "v5p-2"         # the accelerator compiler of GPU estimates (libtpu): one v5p chip, 95 GiB
_TEMPORARIES = re.compile(r"temporaries \(([\d.]+)([KMGT])\)")


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the plan is for. `devices`: what compiles (the slice's, or one proxy device
  for a GPU estimate); `estimate`: True for a GPU (no compiler of its own here)."""
  name: str
  devices: tuple
  hbm_bytes: int              # per device
  bandwidth: float | None     # bytes/s per device
  estimate: bool
  describe: str


def bits(dtype) -> int:
  """Bits of one element of `dtype` (int4: 4, bool: 8)."""
  d = jnp.dtype(dtype)
  if d == jnp.bool_:
    return 8
  return jnp.iinfo(d).bits if jnp.issubdtype(d, jnp.integer) else jnp.finfo(d).bits


def device_bytes(x) -> int:
  """Bytes of one device's shard of a sharded ShapeDtypeStruct (int4: half a byte each)."""
  return math.prod(x.sharding.shard_shape(x.shape)) * bits(x.dtype) // 8


def tree_device_bytes(tree) -> int:
  return sum(device_bytes(x) for x in jax.tree.leaves(tree))


def target(name: str, gpu: str | None = None) -> Target:
  """`gpu` (or a GPU `name`: hardware.GPU_TARGETS) -> a GPU estimate; else a slice or
  cpu:N (`train.planning.aot.topology`)."""
  from train.planning import aot
  chip = hardware.gpu_target(gpu) if gpu else hardware.gpu_target(name)
  if gpu and chip is None:
    raise ValueError(f"--gpu {gpu!r}: expected one of {sorted(hardware.GPU_TARGETS)} or a GPU chip of "
                     f"llamavid_jax/hardware.py ({sorted(k for k, c in hardware.CHIPS.items() if not c.is_tpu)})")
  if chip is not None:
    try:
      devices, proxy = aot.topology(PROXY_TPU).devices[:1], f"the TPU compiler ({PROXY_TPU})"
    except RuntimeError:   # no libtpu
      devices, proxy = tuple(jax.devices("cpu")[:1]), "the CPU compiler (no libtpu: it over-counts)"
    return Target(gpu or name, tuple(devices), chip.hbm_bytes, chip.hbm_bandwidth, True,
                  f"one {chip.name} GPU ({chip.hbm_bytes / GIB:.0f} GiB, {chip.hbm_bandwidth / 1e9:.0f} GB/s) - "
                  f"ESTIMATE: exact bytes, temporaries of a 1-layer compile by {proxy}")
  topo = aot.topology(name)
  bw = None
  if topo.libtpu:
    g = hardware.for_device_kind(topo.device_kind)
    bw = g.hbm_bandwidth * topo.chips / len(topo.devices)
  return Target(name, topo.devices, topo.hbm_bytes, bw, False, topo.describe())


def inference_mesh(cfg, n: int, mesh: dict | None = None) -> tuple[dict, str]:
  """-> (axis sizes, why) for `n` devices: `mesh` (--mesh) where given, else tensor over
  the most devices that divide the LLM's heads and kv heads (decode's usual split: each
  device reads its share of every layer), sequence over the rest."""
  from llamavid_jax.sharding import mesh_sizes
  if mesh:
    return mesh_sizes(mesh, n), "--mesh"
  llm = cfg.llm
  tensor = max(d for d in range(1, n + 1) if n % d == 0 and llm.num_kv_heads % d == 0 and llm.num_heads % d == 0)
  sizes = dict(data=1, fsdp=1, tensor=tensor, sequence=n // tensor)
  return sizes, "tensor over the most devices dividing the heads and kv heads, sequence the rest"


def model_config(model_cfg, seq_len: int, new_tokens: int, dtype: str = "bfloat16", layers: int | None = None):
  """The model as inference runs it: `dtype` params and compute (`inference.load`), room
  for the prompt and answer in RoPE's budget, `layers` LLM layers (the one-layer compile)."""
  llm = model_cfg.llm
  need = -(-(seq_len + new_tokens) // max(llm.rope_scaling, 1))
  llm = dataclasses.replace(llm, max_positions=max(llm.max_positions, need), num_layers=layers or llm.num_layers)
  return dataclasses.replace(model_cfg, dtype=dtype, param_dtype=dtype, llm=llm)


def abstract_params(cfg, mesh, quant: str | None):
  """-> (module, params as sharded ShapeDtypeStructs): the model `inference.load` makes.
  Quantized: Qwix's arrays shaped abstractly and placed as `inference.load` places them
  (`quant.Plan.abstract`: a kernel's int values as the kernel, its scales with them)."""
  from flax import linen as nn
  from llamavid_jax import quant as Q, sharding
  from llamavid_jax.checkpoint import orbax_io
  from llamavid_jax.models import LlamaVid
  boxed = orbax_io.abstract_params(cfg)
  model = LlamaVid(cfg)
  if quant is None:
    shardings = sharding.param_shardings(boxed, mesh)
    return model, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                               shardings)
  plan = Q.Plan(model, quant)
  return plan.model, plan.abstract(mesh, boxed)


def abstract_inputs(cfg, mesh, rows: int, text_len: int, frames: int, features: bool) -> dict:
  """The prompt batch as `Model.request` + `generate.batch_requests` make it (float32
  media), replicated over the mesh as jit places host arrays."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from train.step import abstract_batch
  b = abstract_batch(cfg, rows, text_len, frames, QFORMER_LEN, features)
  b.pop("labels")
  rep = NamedSharding(mesh, P())
  return {k: jax.ShapeDtypeStruct(v.shape, jnp.float32 if k in ("frames", "features") else v.dtype, sharding=rep)
          for k, v in b.items()}


def _oom_temps(message: str) -> int | None:
  m = _TEMPORARIES.search(message)
  return int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)) if m else None


def _compile(lowered) -> tuple[int | None, int, str | None, object, int | None]:
  """-> (XLA's temporaries, aliased bytes, the first line of an over-HBM refusal, the
  output shardings or None, XLA's argument bytes per device or None). A refused
  program's temporaries are the refusal's own figure ("HLO temporaries (64.09G)"),
  None where it gives none."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return _oom_temps(str(e)), 0, str(e).split("\n")[0], None, None
  mem = compiled.memory_analysis()
  return mem.temp_size_in_bytes, mem.alias_size_in_bytes, None, compiled.output_shardings, mem.argument_size_in_bytes


def compile_phases(model, params, batch, mesh, max_len: int, prefill_chunk: int) -> dict:
  """Lowers and compiles `generate`'s prefill (into a cache of `max_len` slots) and one
  decode step -> dict(prefill_temp, decode_temp: XLA's temporaries (None: refused
  without a figure), decode_alias: bytes the decode step aliases (a donated cache),
  refused: the first over-HBM refusal line or None, cache_sharding: the prefill's
  sharding of the cache (where refused: its kv heads split as k_proj's), prefill_args /
  decode_args: XLA's argument bytes per device (None where refused), seconds)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from llamavid_jax import generate as G
  t0 = time.perf_counter()
  lowered = G._prefill_jit.lower(model, params, batch, max_len, prefill_chunk)
  prefill_temp, _, refused, shardings, prefill_args = _compile(lowered)
  if shardings is None:   # refused: the cache's kv heads split as k_proj's are, the rest replicated
    heads = getattr(jax.tree.leaves(params["llm"]["layers"]["k_proj"])[0].sharding, "spec", ())
    kv = NamedSharding(mesh, P(None, None, None, heads[2] if len(heads) > 2 else None))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), lowered.out_info)
    shardings = (shardings[0], dict(shardings[1], k=kv, v=kv), shardings[2])
  state = jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), lowered.out_info, shardings)
  decode = G._decode_jit.lower(model, params, state, jax.random.key(0), jnp.int32(0), 1, 0, 0.0, 0, 1.0)
  decode_temp, alias, refused_decode, _, decode_args = _compile(decode)
  return dict(prefill_temp=prefill_temp, decode_temp=decode_temp, decode_alias=alias, prefill_args=prefill_args,
              decode_args=decode_args,
              refused=refused or refused_decode, cache_sharding=shardings[1]["k"],
              seconds=time.perf_counter() - t0)


def kv_bytes(cache: dict, kv_cache: str | None) -> int:
  """Per-device bytes of the cache's k and v (sharded ShapeDtypeStructs [L, B, T, K, Dh]):
  as compiled, or int8 elements + one KV_SCALE_BYTES scale per (layer, row, slot, kv head)."""
  if kv_cache is None:
    return tree_device_bytes(cache)
  total = 0
  for x in cache.values():
    n = math.prod(x.sharding.shard_shape(x.shape))
    total += n + n // x.shape[-1] * KV_SCALE_BYTES
  return total


def llm_weight_bytes(params) -> int:
  """Per-device bytes of the LLM weights a decode step reads (not the embedding table)."""
  llm = dict(params["llm"])
  llm.pop("embed_tokens", None)
  return tree_device_bytes(llm)


def plan_inference(model_cfg, tgt: Target, shape, *, rows: int = 1, new_tokens: int = 512,
                   quant: str | None = None, kv_cache: str | None = None, mesh: dict | None = None,
                   prefill_chunk: int = 0, features: bool | None = None, dtype: str = "bfloat16") -> dict:
  """The inference plan of a prompt row `shape` (policy.Shape) of `model_cfg` on `tgt`
  -> a JSON-able dict (see the module docstring)."""
  from llamavid_jax import sharding
  from llamavid_jax.quant import check
  check(quant)
  if kv_cache is not None and kv_cache not in KV_CACHES:
    raise ValueError(f"--kv-cache {kv_cache!r}: expected one of {KV_CACHES} (or none: the compute dtype)")
  n = len(tgt.devices)
  sizes, mesh_rule = inference_mesh(model_cfg, n, mesh)
  m = sharding.make_mesh(sizes, list(tgt.devices))
  features = model_cfg.movie if features is None else features
  max_len = shape.seq_len + new_tokens
  full = model_config(model_cfg, shape.seq_len, new_tokens, dtype)
  model, params = abstract_params(full, m, quant)
  batch = abstract_inputs(full, m, rows, shape.text_len, shape.frames, features)
  temps_rule = "the full model compiled for the target"
  ph = None if tgt.estimate else compile_phases(model, params, batch, m, max_len, prefill_chunk)
  if ph is not None and ph["refused"]:
    temps_rule = f"the full model compiled; over HBM, XLA refused it with its temporaries' size: {ph['refused'][:200]}"
  if ph is None or ph["prefill_temp"] is None or ph["decode_temp"] is None:
    if ph is None:
      temps_rule = "ESTIMATE: " + tgt.describe.split(" - ESTIMATE: ")[-1]
    else:
      temps_rule = f"the compiler refused the full model without a figure ({ph['refused'][:160]}); 1-layer temporaries"
    one = model_config(model_cfg, shape.seq_len, new_tokens, dtype, layers=1)
    small_model, small_params = abstract_params(one, m, quant)
    small = compile_phases(small_model, small_params, abstract_inputs(one, m, rows, shape.text_len, shape.frames,
                                                                      features), m, max_len, prefill_chunk)
    if small["prefill_temp"] is None or small["decode_temp"] is None:
      raise RuntimeError(f"one layer's prefill / decode refused without a size: {small['refused']}")
    small.update(layers=1, seconds=small["seconds"] + (ph["seconds"] if ph else 0.0))
    if ph is not None:
      small.update(refused=ph["refused"], cache_sharding=ph["cache_sharding"])
    ph = small
  llm = full.llm
  kv = jax.ShapeDtypeStruct((llm.num_layers, rows, max_len, llm.num_kv_heads, llm.head_dim), jnp.dtype(dtype),
                            sharding=ph["cache_sharding"])
  ph["cache"] = dict(k=kv, v=kv)
  weights = tree_device_bytes(params)
  cache = kv_bytes(ph["cache"], kv_cache)
  inputs = tree_device_bytes(batch)
  prefill_temp, decode_temp = ph["prefill_temp"], ph["decode_temp"]
  # the decode step's cache is donated (aliased), but `generate._grow` copies it: old + new
  caches_live = 2
  prefill = weights + inputs + cache + prefill_temp
  decode = weights + caches_live * cache + decode_temp
  total = max(prefill, decode)
  read = llm_weight_bytes(params) + cache
  spec = full.input_spec
  return dict(
      target=tgt.name, target_describe=tgt.describe, estimate=tgt.estimate, devices=n, mesh=sizes, mesh_rule=mesh_rule,
      seq_len=shape.seq_len, text_len=shape.text_len, num_frames=shape.frames, prompts=shape.prompts,
      tokens_per_frame=spec.tokens_per_frame, shape_rule=shape.rule, media="features" if features else "frames",
      rows=rows, new_tokens=new_tokens, cache_slots=max_len, prefill_chunk=prefill_chunk,
      dtype=dtype, quant=quant, kv_cache=kv_cache or dtype,
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
      if quant is None else None,
      weight_bytes=int(weights), kv_cache_bytes=int(cache), input_bytes=int(inputs),
      prefill_temp_bytes=int(prefill_temp), decode_temp_bytes=int(decode_temp), caches_live_in_decode=caches_live,
      prefill_bytes=int(prefill), decode_bytes=int(decode), per_device_bytes=int(total), hbm_bytes=int(tgt.hbm_bytes),
      fits=bool(total <= tgt.hbm_bytes), temps_rule=temps_rule, layers_compiled=ph.get("layers", llm.num_layers),
      compile_refused=ph.get("refused"), decode_read_bytes=int(read),
      # XLA's own argument bytes per device (weights + inputs; weights + decode state) of the full compile
      prefill_arg_bytes=None if "layers" in ph else ph["prefill_args"],
      decode_arg_bytes=None if "layers" in ph else ph["decode_args"],
      decode_seconds_at_roofline=read / tgt.bandwidth if tgt.bandwidth else None,
      compile_seconds=round(ph["seconds"], 1))


def prompt_row(model_cfg, seq_len: int | None, c=None, frames: int | None = None):
  """The prompt row (policy.Shape) of `seq_len` positions: by `shape_for` from the
  training config `c`'s longest bucket (its row when `seq_len` is None), or without a
  config (--ckpt) from a 256-token question beside the frames."""
  from train.planning.policy import Shape, config_shape, shape_for
  spec = model_cfg.input_spec
  base = config_shape(c, spec) if c is not None else Shape(0, 257, 1, 1, "")
  if seq_len is None:
    if c is None:
      raise ValueError("--seq-len: needed with --ckpt (the prompt's LLM positions)")
    return base
  return shape_for(seq_len, base, spec.tokens_per_frame, model_cfg.frame_chunk or 1, movie=model_cfg.movie,
                   frames=frames)


def _size(x) -> str:
  if x >= GIB / 10:
    return f"{x / GIB:.2f} GiB"
  return f"{x / (1 << 20):.1f} MiB" if x >= 1 << 20 else f"{x / 1024:.1f} KiB"


def describe(p: dict, name: str) -> str:
  """The human-readable inference plan of one `plan_inference` result."""
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  weights = p["quant"] or p["dtype"]
  quant_note = (f" (Qwix {p['quant']}: LLM kernels quantized, the embedding table, ViT and Q-Former in {p['dtype']})"
                if p["quant"] else "")
  kv_note = (f" (int8 k, v + a float32 scale per position and kv head; counted from shapes)"
             if p["kv_cache"] == "int8" else "")
  lines = [
      f"{name}: inference on {p['target_describe']}" + ("" if not p["estimate"] else "  [ESTIMATE]"),
      f"prompt {p['seq_len']} positions = text {p['text_len']} + {p['prompts']} x ({p['num_frames']} frames x "
      f"{p['tokens_per_frame']} - 1)  [{p['shape_rule']}]; {p['rows']} row(s), {p['new_tokens']} new tokens, "
      f"cache {p['cache_slots']} slots; media as {p['media']} (float32)",
      f"mesh {mesh} [{p['mesh_rule']}]",
      f"per device: weights {_size(p['weight_bytes'])} ({weights}){quant_note}",
      f"            KV cache {_size(p['kv_cache_bytes'])} ({p['kv_cache']}){kv_note}",
      f"            inputs {_size(p['input_bytes'])}; temporaries prefill {_size(p['prefill_temp_bytes'])}, "
      f"decode {_size(p['decode_temp_bytes'])} [{p['temps_rule']}]",
      f"            prefill {_size(p['prefill_bytes'])} (weights + inputs + cache + temps), decode "
      f"{_size(p['decode_bytes'])} (weights + {p['caches_live_in_decode']} x cache + temps)",
      f"total {_size(p['per_device_bytes'])} of {_size(p['hbm_bytes'])} -> fits: {'yes' if p['fits'] else 'NO'}"
      + ("  [ESTIMATE]" if p["estimate"] else ""),
  ]
  if not p["fits"]:
    parts = {"weights": p["weight_bytes"], "the KV cache": p["kv_cache_bytes"], "inputs": p["input_bytes"],
             "prefill temporaries": p["prefill_temp_bytes"], "decode temporaries": p["decode_temp_bytes"]}
    big = max(parts, key=parts.get)
    lines.append(f"largest part: {big} ({_size(parts[big])}); the total is {_size(p['per_device_bytes'] - p['hbm_bytes'])} "
                 "over")
  if p["decode_seconds_at_roofline"]:
    s = p["decode_seconds_at_roofline"]
    lines.append(f"decode at the HBM roofline: {_size(p['decode_read_bytes'])} read a token per device -> "
                 f"{s * 1e3:.1f} ms a token ({1 / s:.1f} tokens/s)")
  lines.append(f"compiled in {p['compile_seconds']:.1f} s")
  return "\n".join(lines)


def table(plans: list[dict]) -> str:
  head = ("seq_len", "weights", "quant", "kv", "W GiB", "KV GiB", "in GiB", "temps GiB", "total GiB", "HBM",
          "fits", "ms/token")
  rows = [head]
  for p in plans:
    rows.append((str(p["seq_len"]), p["dtype"], p["quant"] or "-", p["kv_cache"], f"{p['weight_bytes'] / GIB:.2f}",
                 f"{p['kv_cache_bytes'] / GIB:.2f}", f"{p['input_bytes'] / GIB:.2f}",
                 f"{max(p['prefill_temp_bytes'], p['decode_temp_bytes']) / GIB:.2f}",
                 f"{p['per_device_bytes'] / GIB:.2f}", f"{p['hbm_bytes'] / GIB:.0f}",
                 ("yes" if p["fits"] else "NO") + ("*" if p["estimate"] else ""),
                 f"{p['decode_seconds_at_roofline'] * 1e3:.1f}" if p["decode_seconds_at_roofline"] else "-"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  out = "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows)
  return out + ("\n* estimate (GPU: exact bytes, temporaries of a 1-layer compile)" if any(
      p["estimate"] for p in plans) else "")
