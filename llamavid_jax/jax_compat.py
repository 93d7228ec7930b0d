"""The JAX features this code relies on beyond the public basics, checked once.

Each is read through its documented attribute; an older or newer JAX that lacks it fails
here with one line naming the version tested (no `getattr` probes with silent defaults)."""

from __future__ import annotations

import jax

TESTED = "0.10.2"
MINIMUM = (0, 10)


def _version() -> tuple[int, ...]:
  return tuple(int(p) for p in jax.__version__.split(".")[:2] if p.isdigit())


def require(what: str) -> None:
  """Raises RuntimeError naming `what` when the installed JAX is older than MINIMUM."""
  if _version() < MINIMUM:
    raise RuntimeError(f"{what} needs jax >= {'.'.join(map(str, MINIMUM))} (tested {TESTED}); "
                       f"installed {jax.__version__}")


def require_splash_vendored() -> None:
  """The vendored splash kernel (ops/attention/third_party, from JAX 0.10.2) uses JAX's own
  mask modules: refuse a JAX whose minor version differs (re-vendor from it instead)."""
  if _version()[:2] != (0, 10):
    raise RuntimeError(f"the vendored splash attention kernel is JAX 0.10.2's; installed jax {jax.__version__}: "
                       f"re-vendor llamavid_jax/ops/attention/third_party/splash_attention_kernel.py from it")


def in_host_memory(x) -> bool:
  """Whether the traced or concrete array x lives in host memory (`jax.memory.Space.Host`)."""
  require("host-memory inputs (jax.typeof(x).memory_space)")
  return jax.typeof(x).memory_space == jax.memory.Space.Host


def mesh_platform(mesh) -> str:
  """The platform of an abstract mesh's devices ("tpu", "gpu", "cpu"): an ahead-of-time
  plan for a TPU topology on a CPU host reports "tpu"."""
  require("the platform of an abstract mesh (AbstractMesh.abstract_device)")
  return mesh.abstract_device.platform
