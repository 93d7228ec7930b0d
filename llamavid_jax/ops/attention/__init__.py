"""The one attention entry point of every model.

Modules call `attention(q, k, v, kv_valid=, q_slots=, kv_slots=, impl=, tower=)`; the
implementation is looked up by name in `IMPLS`, where each declares what it supports, so
kernels are added here without touching any model.

Shapes: q float[B, S, H, Dh]; k, v float[B, T, K, Dh] with H % K == 0 (grouped-query
attention). The mask is structured (masks.py), never a dense [S, T] input.

Modules (one kernel each):
  dense.py      xla (jax.nn.dot_product_attention on a dense mask), reference (fp32 einsum)
  blockwise.py  chunked (flash-style online softmax, custom VJP) and ring (the same,
                sequence-sharded over the mesh axes of the logical `length` axis)
  splash.py     TPU Pallas splash attention, and a ring of splash steps (zig-zag layout)
  cudnn.py      GPU cuDNN flash attention for the training layout
  auto          per backend and tower (`auto_impl`)

Towers: "llm" (causal, may run as a ring where the mesh splits `length`), "vit" and
"qformer" (short, never a ring: their lengths are not split). The choice for a tower is
logged once per distinct decision (`decide`), and `describe` returns it as a line.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
import jax.numpy as jnp

from llamavid_jax import jax_compat
from llamavid_jax.ops.attention.blockwise import BLOCK, chunked, current_mesh, length_axis, ring, ring_block_counts, \
    ring_length, visible_blocks
from llamavid_jax.ops.attention.cudnn import cudnn
from llamavid_jax.ops.attention.dense import reference, xla
from llamavid_jax.ops.attention.masks import NEG, dense_mask
from llamavid_jax.ops.attention.splash import splash, splash_block
from llamavid_jax.parallel.layout import ring_order, ring_shift, zigzag   # the ring's layout (re-exported)

log = logging.getLogger(__name__)

TOWERS = ("llm", "vit", "qformer")
RING_TOWERS = ("llm",)   # the only tower whose length the logical rules split


@dataclasses.dataclass(frozen=True)
class Impl:
  """An attention implementation and what it supports.

  fn(q, k, v, kv_valid, q_slots, kv_slots, scale); backends: where it runs (None: any);
  layouts: "causal" (q_slots given), "full" (no causality), "slots" (explicit key slots,
  e.g. the zig-zag order); kv_cache: a cache of T != S keys; dtypes: None any, else the
  names it takes; ring: runs as a ring where the mesh splits `length` (LLM only)."""
  fn: Callable
  backends: tuple[str, ...] | None = None
  layouts: tuple[str, ...] = ("causal", "full", "slots")
  kv_cache: bool = True
  dtypes: tuple[str, ...] | None = None
  ring: bool = False
  note: str = ""


IMPLS: dict[str, Impl] = {
    "xla": Impl(xla, note="dense mask (short sequences)"),
    "reference": Impl(reference, note="fp32 einsum, the numerical reference"),
    "chunked": Impl(chunked, note="blockwise online softmax, O(S x block) memory"),
    "ring": Impl(ring, ring=True, note="blockwise, sequence-sharded ring; `chunked` where the length is whole"),
    "cudnn": Impl(cudnn, backends=("gpu",), layouts=("causal",), kv_cache=False, dtypes=("bfloat16", "float16"),
                  note="cuDNN flash, training layout; `chunked` for others"),
    "splash": Impl(splash, backends=("tpu",), layouts=("causal", "slots"), kv_cache=False, ring=True,
                   note="Pallas splash, training layout in whole blocks; a ring of splash steps when split"),
    "auto": Impl(None, ring=True, note="per backend and tower (auto_impl)"),
}


def target_backend() -> str:
  """The platform the current computation is for: that of the enclosing mesh's devices
  (a TPU topology's in an ahead-of-time plan on a CPU host), else JAX's default."""
  mesh = current_mesh()
  backend = jax.default_backend() if mesh is None else jax_compat.mesh_platform(mesh)
  return "gpu" if backend in ("cuda", "rocm") else backend


def ring_shards(impl: str, tower: str = "llm") -> int:
  """The number of ring devices `impl` splits the sequence of `tower` over under the
  current mesh and logical rules (1: no ring)."""
  if tower not in RING_TOWERS or impl not in IMPLS or not IMPLS[impl].ring:
    return 1
  return length_axis()[1]


RING_IMPLS = tuple(name for name, i in IMPLS.items() if i.ring)   # those that run as a ring where `length` splits


def auto_impl(q_shape, k_shape, causal: bool, explicit_slots: bool, backend: str | None = None,
              dtype=jnp.bfloat16, tower: str = "llm") -> str:
  """What `auto` runs: for the LLM where the current mesh splits the length, a ring (of
  splash steps on TPU, else `ring`); else per backend, `splash` on TPU (causal
  self-attention in whole blocks), `cudnn` on GPU (in bf16 / fp16: cuDNN's flash kernel
  has no fp32), `chunked` elsewhere (and wherever the fused kernels do not apply). The ViT
  and the Q-Former never ring."""
  backend = backend or target_backend()
  s, t = q_shape[1], k_shape[1]
  n = ring_shards("ring", tower)
  if n > 1:   # splash inside the ring on TPU, for the zig-zag training layout in whole 128-blocks
    fits = causal and s == t and s % (2 * n) == 0 and splash_block(s // (2 * n))
    return "splash" if backend == "tpu" and fits else "ring"
  if backend == "tpu" and causal and not explicit_slots and s == t and s >= 128 and s % min(BLOCK, s) == 0:
    return "splash"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend == "gpu" and causal and not explicit_slots and s == t and half:
    return "cudnn"
  return "chunked"


_LOGGED: set[str] = set()


def decide(impl: str, tower: str, q_shape, k_shape, causal: bool, explicit_slots: bool, dtype) -> tuple[str, str]:
  """-> (the implementation that runs, one line saying so) for `impl` on `tower`; the
  line is logged once per distinct decision (at trace time, before compiling)."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl {impl!r}: expected one of {sorted(IMPLS)}")
  if tower not in TOWERS:
    raise ValueError(f"attention tower {tower!r}: expected one of {TOWERS}")
  name = auto_impl(q_shape, k_shape, causal, explicit_slots, dtype=dtype, tower=tower) if impl == "auto" else impl
  if name in ("ring", "splash") and tower not in RING_TOWERS and IMPLS[name].ring:
    name = "chunked" if name == "ring" else name            # a ViT / Q-Former length is never split
  n = ring_shards(name, tower)
  how = f"a ring over {n} devices" if n > 1 else "one device a sequence"
  line = f"attention {tower}: {impl}" + (f" -> {name}" if name != impl else "") + \
         f" ({how}; S={q_shape[1]}, T={k_shape[1]}, {jnp.dtype(dtype).name})"
  if line not in _LOGGED:
    _LOGGED.add(line)
    log.info("%s", line)
  return name, line


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_valid: jax.Array | None = None,
              q_slots: jax.Array | None = None, kv_slots: jax.Array | None = None, impl: str = "xla",
              scale: float | None = None, tower: str = "llm") -> jax.Array:
  """Scaled dot-product attention -> float[B, S, H, Dh] (see the module docstring)."""
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  name, _ = decide(impl, tower, q.shape, k.shape, q_slots is not None, kv_slots is not None, q.dtype)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return IMPLS[name].fn(q, k, v, kv_valid, q_slots, kv_slots, scale)


__all__ = ["attention", "IMPLS", "Impl", "TOWERS", "RING_IMPLS", "BLOCK", "NEG", "auto_impl", "decide", "dense_mask",
           "ring_block_counts", "ring_length", "ring_order", "ring_shards", "ring_shift", "target_backend", "visible_blocks", "zigzag",
           "xla", "reference", "chunked", "ring", "cudnn", "splash"]
