"""The flags every inference command shares, spelled once: where the model comes from
and how it is held (`--ckpt`, `--dtype`, `--mesh`, `--quant`, `--kv-cache`), checked
before anything is loaded, the one call that loads it (`load`), and the sampling flags
(`add_sampling_flags`, `check_sampling_flags`).

  p = argparse.ArgumentParser(...)
  args.add_model_flags(p)                  # --ckpt --dtype --mesh --quant --kv-cache
  a = p.parse_args(argv)
  args.check_model_flags(p, a)             # a bad mesh / quant / kv-cache: p.error (exit 2), nothing loaded
  m = args.load(a)                         # inference.load(a.ckpt, dtype=, mesh=, quant=, kv_cache=)

`--mesh` is `axis=size[,axis=size...]` over the training's axes (data, fsdp, tensor,
sequence), e.g. `tensor=4,sequence=2`; the sizes must use every device (one size may
be -1: the rest). Parameters are placed by the training's logical rules
(`llamavid_jax.sharding`), so `tensor` splits heads and MLP columns, `fsdp` the
embedding width, `data` replicates the model over request rows; with `--quant`, a
kernel's int values split as the kernel would and its scales with them.
"""

from __future__ import annotations

import argparse

from llamavid_jax import inference, sharding
from llamavid_jax.models.config import KV_CACHES

QUANT = ("int8", "int4")


def add_model_flags(p: argparse.ArgumentParser, *, dtype: str = "float32", ckpt_required: bool = True) -> None:
  p.add_argument("--ckpt", required=ckpt_required,
                 help="converted / inference directory, or a train.train WORKDIR (its latest step)")
  p.add_argument("--dtype", default=dtype, choices=inference.DTYPES, help=f"parameters and compute (default {dtype})")
  p.add_argument("--mesh", default=None, metavar="AXIS=N[,AXIS=N]",
                 help="split the model over the devices, e.g. tensor=4,sequence=2 (axes: "
                      f"{', '.join(sharding.MESH_AXES)}; default: one device)")
  p.add_argument("--quant", default=None, choices=QUANT,
                 help="LLM weights quantized with Qwix: int8 per channel, int4 per group (default: none)")
  p.add_argument("--kv-cache", default=None, choices=KV_CACHES,
                 help="decoding KV cache stored as int8 with a float32 scale per position and key/value head "
                      "(about half the bytes of bf16; default: the compute dtype)")


def add_sampling_flags(p: argparse.ArgumentParser, *, new_tokens: str, temperature: str = "the release's, 0.2 for "
                       "chat, 0.6 for a movie feature file", top_p: str = "the release's, 0.7 for chat, 0.9 for a movie",
                       prefill: bool = True) -> None:
  """The generation flags (chat, web demo, benchmark runner): --temperature, --top-p,
  --max-new-tokens (None where not given: each command says its default in the help),
  --seed and, with `prefill`, --prefill-chunk."""
  p.add_argument("--temperature", type=float, help=f"0: greedy (default: {temperature})")
  p.add_argument("--top-p", type=float, help=f"default: {top_p}")
  p.add_argument("--max-new-tokens", type=int, help=f"default: {new_tokens} (a value given must fit the positions)")
  p.add_argument("--seed", type=int, default=0)
  if prefill:
    p.add_argument("--prefill-chunk", type=int, default=0, help="prefill C positions at a time (0: all at once)")


def check_sampling_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
  """Validates the sampling flags (`validation.check_sampling`; p.error exits, naming
  every bad flag) -> keyword arguments of generate/stream (None where not given)."""
  from llamavid_jax import validation
  prefill = getattr(a, "prefill_chunk", None)
  errs = validation.check_sampling(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                                   prefill_chunk=prefill)
  if errs:
    p.error("; ".join(errs))
  kw = dict(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed)
  return kw if prefill is None else {**kw, "prefill_chunk": prefill}


def parse_mesh(text: str) -> dict[str, int]:
  """"tensor=4,sequence=2" -> {"tensor": 4, "sequence": 2}; raises ValueError naming the
  part that is wrong (an unknown axis, a size that is no integer, sizes that do not use
  the devices there are)."""
  import jax
  shape = {}
  for part in text.split(","):
    axis, eq, size = part.strip().partition("=")
    if not eq or not axis:
      raise ValueError(f"{part.strip()!r}: expected AXIS=N")
    if axis in shape:
      raise ValueError(f"axis {axis!r} given twice")
    try:
      shape[axis] = int(size)
    except ValueError:
      raise ValueError(f"{part.strip()!r}: the size is not an integer") from None
  return sharding.mesh_sizes(shape, jax.device_count())


def check_model_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
  """Refuses (p.error: one line, exit 2) a bad --mesh or --quant before any load."""
  if a.mesh is not None:
    try:
      a.mesh_sizes = parse_mesh(a.mesh)
    except ValueError as e:
      p.error(f"--mesh {a.mesh}: {e}")
  else:
    a.mesh_sizes = None


def load(a: argparse.Namespace, **kw) -> inference.Model:
  """The checked flags' model: `inference.load(a.ckpt, dtype, mesh, quant, kv_cache, **kw)`."""
  sizes = getattr(a, "mesh_sizes", None)
  if sizes:
    kw["mesh"] = sharding.make_mesh(sizes)
  if getattr(a, "quant", None):
    kw["quant"] = a.quant
  if getattr(a, "kv_cache", None):
    kw["kv_cache"] = a.kv_cache
  return inference.load(a.ckpt, dtype=a.dtype, **kw)
