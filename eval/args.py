"""The flags every inference command shares, spelled once: where the model comes from
and how it is held (`--ckpt`, `--dtype`, `--mesh`, `--quant`), checked before anything
is loaded, and the one call that loads it (`load`).

  p = argparse.ArgumentParser(...)
  args.add_model_flags(p)                  # --ckpt --dtype --mesh --quant
  a = p.parse_args(argv)
  args.check_model_flags(p, a)             # a bad mesh / quant: p.error (exit 2), nothing loaded
  m = args.load(a)                         # inference.load(a.ckpt, dtype=, mesh=, quant=)

`--mesh` is `axis=size[,axis=size...]` over the training's axes (data, fsdp, tensor,
sequence), e.g. `tensor=4,sequence=2`; the sizes must use every device (one size may
be -1: the rest). Parameters are placed by the training's logical rules
(`llamavid_jax.sharding`), so `tensor` splits heads and MLP columns, `fsdp` the
embedding width, `data` replicates the model over request rows.
"""

from __future__ import annotations

import argparse

from llamavid_jax import inference, sharding

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
    if a.quant is not None:
      p.error(f"--quant {a.quant} with --mesh: quantized parameters are not placed on a mesh yet")
  else:
    a.mesh_sizes = None


def load(a: argparse.Namespace, **kw) -> inference.Model:
  """The checked flags' model: `inference.load(a.ckpt, dtype, mesh, quant, **kw)`."""
  sizes = getattr(a, "mesh_sizes", None)
  if sizes:
    kw["mesh"] = sharding.make_mesh(sizes)
  if getattr(a, "quant", None):
    kw["quant"] = a.quant
  return inference.load(a.ckpt, dtype=a.dtype, **kw)
