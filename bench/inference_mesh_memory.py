"""Per-device memory of inference on a mesh, from XLA's compiled memory analysis:
`generate`'s prefill and one decode step of the 7B-shaped 2-layer slice (bench/generate.py's
SLICE_7B: d_model 4096, 32 heads, mlp 11008, vocab 32000; the tiny ViT and Q-Former
beside it) in bf16, Qwix int8 and int4, on one device and on 8 with tensor=8. Everything
is abstract (ShapeDtypeStructs with shardings, `train.plan --inference`'s
`plan_inference`): nothing 7B-sized is materialised, only compiled.

  PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python bench/inference_mesh_memory.py [--seq-len 1024] [--new-tokens 32]

Columns, per device:
  weights    XLA's argument bytes of the compiled prefill less its inputs' (the prompt
             ids and media): the parameters as placed (`inference.load(mesh=, quant=)`:
             a quantized kernel's int values split as the kernel, its scales with them;
             int4 counts half a byte)
  (shapes)   the same from the parameters' shapes and shardings (must agree)
  KV         the cache's k and v, sharded as the compiled prefill returns it
  temps      XLA's temporaries, prefill / decode (the CPU compiler's: it computes bf16
             matmuls in f32, so these over-count an accelerator's)
  ratio      weights / the same mode's one-device weights (issue #23: <= 1/6 on tensor 8)
Then, per mode, the LLM arrays that tensor 8 cannot split as their names ask (int4:
down_proj's 86 groups of 128 inputs along mlp do not split 8 ways, so its scales are
whole on every device while its int values split).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

MIB = 1 << 20
MODES = ("bfloat16", "int8", "int4")


def mesh_memory(cfg, quant: str | None, mesh: dict | None, seq_len: int = 1024, new_tokens: int = 32) -> dict:
  """The compiled per-device bytes of `cfg`'s prefill of a `seq_len`-position prompt
  (tiny features frames beside the text) and a decode step, `quant` weights (None:
  bf16), on cpu:N devices with `mesh` (None: one device) -> the plan (`plan_inference`)
  plus `weight_compiled_bytes` (XLA's prefill argument bytes less the inputs')."""
  from train.planning import inference as I
  n = math.prod(mesh.values()) if mesh else 1
  row = I.prompt_row(cfg, seq_len)
  p = I.plan_inference(cfg, I.target(f"cpu:{n}"), row, new_tokens=new_tokens, quant=quant, mesh=mesh,
                       features=True, dtype="bfloat16")
  p["weight_compiled_bytes"] = p["prefill_arg_bytes"] - p["input_bytes"]
  return p


def table(cfg, meshes=(None, {"tensor": 8}), modes=MODES, **kw) -> tuple[str, dict]:
  """(the printed table, {(mode, devices): plan}) over `modes` x `meshes`."""
  head = ("mode", "devices", "weights MiB", "(shapes)", "KV MiB", "temps prefill MiB", "temps decode MiB", "ratio")
  rows, plans = [head], {}
  for mode in modes:
    for mesh in meshes:
      p = mesh_memory(cfg, None if mode == "bfloat16" else mode, mesh, **kw)
      name = "1" if not mesh else " x ".join(f"{k} {v}" for k, v in mesh.items())
      plans[(mode, name)] = p
      base = plans[(mode, "1")]["weight_compiled_bytes"]
      rows.append((mode, name, f"{p['weight_compiled_bytes'] / MIB:.1f}", f"{p['weight_bytes'] / MIB:.1f}",
                   f"{p['kv_cache_bytes'] / MIB:.2f}", f"{p['prefill_temp_bytes'] / MIB:.1f}",
                   f"{p['decode_temp_bytes'] / MIB:.1f}", f"{p['weight_compiled_bytes'] / base:.3f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows), plans


def decisions(cfg, quant: str | None, mesh: dict) -> list[str]:
  """The LLM's arrays that keep fewer mesh axes than their logical names ask on `mesh`
  (replicated along a dim the axes do not divide), as `inference.load` prints them."""
  import jax
  from llamavid_jax import quant as Q, sharding
  from llamavid_jax.checkpoint import orbax_io
  from llamavid_jax.models import LlamaVid
  from train.planning import inference as I
  full = I.model_config(cfg, 1, 1)
  m = sharding.make_mesh(mesh, jax.devices()[:math.prod(mesh.values())])
  lines = (sharding.replicated_leaves(orbax_io.abstract_params(full), m) if quant is None
           else Q.Plan(LlamaVid(full), quant).placement(m)[1])
  return [line for line in lines if line.startswith("llm/")]


def slice_7b():
  """The 7B-shaped 2-layer slice of bench/generate.py (one place for its shape)."""
  from bench.generate import SLICE_7B
  from configs import tiny
  return dataclasses.replace(tiny.model_config(), llm=SLICE_7B)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seq-len", type=int, default=1024, help="prompt positions (default 1024)")
  ap.add_argument("--new-tokens", type=int, default=32, help="answer slots of cache (default 32)")
  a = ap.parse_args()
  import jax
  if jax.device_count() < 8:
    ap.error(f"{jax.device_count()} devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  text, _ = table(slice_7b(), seq_len=a.seq_len, new_tokens=a.new_tokens)
  print(f"7B-shaped 2-layer slice, prompt {a.seq_len} positions + {a.new_tokens} new, batch 1, bf16 compute; "
        "per device, from XLA's compiled memory analysis (CPU compiler)")
  print(text)
  for mode in MODES:
    lines = decisions(slice_7b(), None if mode == "bfloat16" else mode, {"tensor": 8})
    print(f"{mode} on tensor 8, LLM arrays not split as their names ask: " + ("; ".join(lines) or "none"))


if __name__ == "__main__":
  main()
