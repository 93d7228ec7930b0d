"""Accelerator facts, one place: per chip, the dense bf16 peak, HBM size and bandwidth,
and host memory; the planner (train/plan.py), MFU (train/metrics.py) and roofline
estimates (step time >= bytes moved / `hbm_bandwidth`) read them from here.

Figures are the vendors' published ones (sources on each entry), dense (no 2:4
sparsity), bf16 inputs with fp32 accumulation. HBM is what the device reports as
usable, counted in GiB as the vendors' "GB" figures are in practice (a v5p's 95,
an H100's 80). `host_bytes`: the host memory of the usual VM over its chips (Cloud
TPU's VM shapes; for GPUs Google Cloud's A2/A3/G2 shapes); None where there is no
usual machine (workstation cards).

Look-ups: `chip(name)` by key, `for_device_kind(kind)` by jax's `device.device_kind`
("TPU v5", "NVIDIA H100 80GB HBM3", ...), `tpu_generation(prefix)` by a Cloud TPU
slice name's prefix ("v5p" in v5p-8, "v5litepod" in v5litepod-16), `gpu_target(name)`
by a GPU planning target ("24GB", "gpu-24g", "h100-80g", or a chip key: `GPU_TARGETS`).
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1 << 30
GB = 10 ** 9
TB = 10 ** 12


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip. TPU chips also say how Cloud TPU names slices of them:
  `libtpu` (the topology name prefix), `cores_per_chip` (what a slice name's N counts
  per chip: TensorCores on v4 / v5p, chips on v5e / v6e) and `torus_dims`."""
  name: str
  peak_bf16_flops: float        # FLOP/s per chip, dense bf16
  hbm_bytes: int                # per chip
  hbm_bandwidth: float          # bytes/s per chip
  host_bytes: int | None        # host memory per chip on the usual VM
  kinds: tuple[str, ...] = ()   # regexes matched (fullmatch) against jax's device_kind
  libtpu: str | None = None
  cores_per_chip: int = 1
  torus_dims: int = 0

  @property
  def is_tpu(self) -> bool:
    return self.libtpu is not None


CHIPS: dict[str, Chip] = {c.name: c for c in (
    # Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e):
    # peak bf16, HBM, HBM bandwidth per chip; host memory: the VM shapes' memory over their 4 chips
    # (v4: 407 GiB, v5e ct5lp-hightpu-4t: 192, v5p: 448, v6e ct6e-standard-4t: 720).
    Chip("v4", 275e12, 32 * GIB, 1200 * GB, 407 * GIB // 4, (r"TPU v4",), "v4", 2, 3),
    Chip("v5e", 197e12, 16 * GIB, 819 * GB, 192 * GIB // 4, (r"TPU v5 lite", r"TPU v5e"), "v5e", 1, 2),
    Chip("v5p", 459e12, 95 * GIB, 2765 * GB, 448 * GIB // 4, (r"TPU v5", r"TPU v5p"), "v5p", 2, 3),
    Chip("v6e", 918e12, 32 * GIB, 1640 * GB, 720 * GIB // 4, (r"TPU v6 lite", r"TPU v6e"), "v6e", 1, 2),
    # NVIDIA A100 datasheet (2021): bf16 tensor 312 TFLOPS dense; 40GB HBM2 1,555 GB/s (SXM),
    # 80GB HBM2e 2,039 GB/s (SXM; PCIe 1,935). Host: GCP a2-highgpu-8g 680 GB / 8, a2-ultragpu-8g 1360 GB / 8.
    Chip("a100-40gb", 312e12, 40 * GIB, 1555 * GB, 85 * GB, (r"NVIDIA A100.*40GB.*",)),
    Chip("a100-80gb", 312e12, 80 * GIB, 2039 * GB, 170 * GB, (r"NVIDIA A100.*80GB.*",)),
    # NVIDIA H100 datasheet: SXM bf16 tensor 989 TFLOPS dense (1,979 with sparsity), 80GB HBM3 3.35 TB/s;
    # PCIe 756 TFLOPS, 2.0 TB/s. Host: GCP a3-highgpu-8g 1872 GB / 8.
    Chip("h100", 989e12, 80 * GIB, 3.35 * TB, 234 * GB, (r"NVIDIA H100 80GB HBM3", r"NVIDIA H100 SXM.*")),
    Chip("h100-pcie", 756e12, 80 * GIB, 2.0 * TB, None, (r"NVIDIA H100 PCIe",)),
    # NVIDIA H200 datasheet: SXM bf16 989 TFLOPS dense, 141 GB HBM3e (~140 GiB usable) at 4.8 TB/s.
    # Host: GCP a3-ultragpu-8g 2952 GB / 8.
    Chip("h200", 989e12, 140 * GIB, 4.8 * TB, 369 * GB, (r"NVIDIA H200.*",)),
    # NVIDIA L4 datasheet: bf16 121 TFLOPS dense (242 with sparsity), 24 GB GDDR6 at 300 GB/s.
    # Host: GCP g2-standard-96 384 GB / 8.
    Chip("l4", 121e12, 24 * GIB, 300 * GB, 48 * GB, (r"NVIDIA L4",)),
    # NVIDIA A10 datasheet: bf16 125 TFLOPS dense (250 with sparsity), 24 GB GDDR6 at 600 GB/s.
    Chip("a10", 125e12, 24 * GIB, 600 * GB, None, (r"NVIDIA A10",)),
    # NVIDIA RTX A6000 datasheet / Ampere GA102 whitepaper: bf16 tensor 154.8 TFLOPS dense
    # (309.7 with sparsity), 48 GB GDDR6 at 768 GB/s.
    Chip("rtx-a6000", 154.8e12, 48 * GIB, 768 * GB, None, (r"NVIDIA RTX A6000",)),
    # Ada Lovelace whitepaper (RTX 4090): bf16 tensor with fp32 accumulate 165.2 TFLOPS dense,
    # 24 GB GDDR6X at 1,008 GB/s.
    Chip("rtx-4090", 165.2e12, 24 * GIB, 1008 * GB, None, (r"NVIDIA GeForce RTX 4090",)),
    # Ampere GA102 whitepaper (RTX 3090): bf16 tensor with fp32 accumulate 71 TFLOPS dense,
    # 24 GB GDDR6X at 936 GB/s.
    Chip("rtx-3090", 71e12, 24 * GIB, 936 * GB, None, (r"NVIDIA GeForce RTX 3090",)),
)}

# Cloud TPU slice-name prefixes ("v5litepod-16" is a v5e slice).
TPU_SLICE_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}


# GPU targets of the inference planner (`python -m train.plan --inference --gpu 24GB`): a
# memory class stands for the cloud card of that size (the L4 is Google Cloud's 24 GB
# card and the slowest of them: its bandwidth bounds decode time from above).
GPU_TARGETS = {"24GB": "l4", "gpu-24g": "l4", "48GB": "rtx-a6000", "gpu-48g": "rtx-a6000",
               "40GB": "a100-40gb", "80GB": "h100", "gpu-80g": "h100", "h100-80g": "h100",
               "a100-80g": "a100-80gb", "141GB": "h200", "h200-141g": "h200"}


def chip(name: str) -> Chip:
  if name not in CHIPS:
    raise KeyError(f"no hardware figures for {name!r}; known: {sorted(CHIPS)}")
  return CHIPS[name]


def for_device_kind(kind: str) -> Chip | None:
  """The chip whose `kinds` match jax's `device_kind` exactly ("TPU v5" is a v5p,
  "TPU v5 lite" a v5e); None for CPUs and chips without figures here."""
  for c in CHIPS.values():
    if any(re.fullmatch(k, kind) for k in c.kinds):
      return c
  return None


def tpu_generation(prefix: str) -> Chip | None:
  """The TPU chip of a slice-name prefix ("v5p", "v5litepod"); None if unknown."""
  name = TPU_SLICE_PREFIXES.get(prefix)
  return CHIPS[name] if name else None


def gpu_target(name: str) -> Chip | None:
  """The GPU chip a planning target names: an alias of `GPU_TARGETS` ("24GB",
  "h100-80g") or a GPU chip key ("rtx-4090"); None for anything else (TPU names)."""
  c = CHIPS.get(GPU_TARGETS.get(name, name))
  return c if c is not None and not c.is_tpu else None


def peak_flops(kind: str) -> float | None:
  """Dense bf16 FLOP/s of one device of `device_kind` (None: no figure, e.g. CPU)."""
  c = for_device_kind(kind)
  return c.peak_bf16_flops if c else None
