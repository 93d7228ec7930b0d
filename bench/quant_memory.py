"""Peak host memory of loading a model quantized (llamavid_jax/quant.py), on the CPU.

  python bench/quant_memory.py [--quant int8] [--all] [--keep DIR] [--env KEY=VALUE]

Writes a bf16 inference directory of the 7B-shaped 2-layer slice (bench/generate.py's
SLICE_7B: d_model 4096, mlp 11008, vocab 32000; tiny vision towers) to a temp dir, saves
it quantized (`python -m llamavid_jax.quant save`), then loads, each in a fresh process
that prints its VmHWM (the peak resident set of its own address space; unlike
ru_maxrss it does not start at the parent's peak):

  floor     the imports and the tokenizers, no parameter (`inference.load` of a checkpoint
            with its parameters swapped for nothing is not possible, so: the modules
            imported and both tokenizers loaded);
  bf16      `inference.load(BF16)`: the float model, for scale;
  whole     the float tree restored on the host, then quantized (what `inference.load`
            with quant did before it streamed);
  stream    `inference.load(BF16, quant=Q)`: read a leaf at a time, each quantized before
            the next is read;
  stored    `inference.load(QDIR)`: the quantized checkpoint read as stored.

Each line gives the peak, the peak less the floor, and both as multiples of the
quantized parameters' bytes (on the device, which on the CPU is this process's memory).
`--env KEY=VALUE` sets a variable in the measured processes (e.g. glibc's
MALLOC_MMAP_THRESHOLD_=65536: freed large buffers go back to the system at once).

Measured (2-core dev CPU, int8, python bench/quant_memory.py --all): checkpoints bf16
1017 MiB, int8 595 MiB on disk (int4: 309 MiB, packed); floor 399 MiB; quantized
parameters 669 MiB (LLM 636 + the float towers); bf16 load 3093 MiB; whole (before)
3094 MiB = 4.03x them less the floor; stream 1535 MiB = 1.70x less the floor (2.30x with
it); stored 1279 MiB = 1.32x less the floor (1.91x with it); the last two move by ~50
MiB from run to run (the allocator). With --env MALLOC_MMAP_THRESHOLD_=65536 stream
1433 and 1582 MiB, stored 1224 and 1225 MiB (two runs). The floor alone is 0.6x the int8
parameters of this slice, so 1.5x with it is out of reach here; what stream holds above
"stored" is one float leaf being read (a read takes twice the leaf: the reader's buffer
and the array), its slices' temporaries, and memory the allocator keeps after frees.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def vm_hwm() -> int:
  """This process's peak resident bytes (/proc/self/status VmHWM, kB)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def build(out: str) -> None:
  """A bf16 inference directory of the 7B slice, with the test tokenizers."""
  import jax
  import numpy as np
  from flax import linen as nn
  from bench.generate import SLICE_7B
  from configs import tiny
  from llamavid_jax.checkpoint import orbax_io
  from tests import torch_llamavid as tl
  cfg = dataclasses.replace(tiny.model_config(), llm=SLICE_7B)
  shapes = orbax_io.shape_tree(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (rng.standard_normal(s, np.float32) * 0.02).astype(jax.numpy.bfloat16), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  tok = os.path.join(os.path.dirname(out), "tok")
  tl.write_sp_tokenizer(tok)
  tl.write_bert_vocab(os.path.join(tok, "bert"))
  orbax_io.save_inference(out, nn.unbox(params), cfg, {"source": "bench/quant_memory.py"}, tok,
                          os.path.join(tok, "bert"), exact_vocab=False)


def child(kind: str, path: str, quant: str) -> None:
  """One measurement (module docstring); prints `VmHWM quantized-bytes`."""
  import jax
  from llamavid_jax import inference
  from llamavid_jax import quant as Q
  from llamavid_jax.checkpoint import orbax_io
  from llamavid_jax.models import LlamaVid
  nbytes = lambda t: sum(a.nbytes for a in jax.tree.leaves(t))
  if kind == "floor":
    from llamavid_jax.data.tokenizer import load_llm_tokenizer, load_qformer_tokenizer
    load_llm_tokenizer(os.path.join(path, "tokenizer"))
    load_qformer_tokenizer(os.path.join(path, "qformer_tokenizer"))
    size = 0
  elif kind == "whole":
    loaded = orbax_io.load_for_inference(path, dtype=jax.numpy.bfloat16)
    model = LlamaVid(dataclasses.replace(loaded.cfg, dtype="bfloat16"))
    _, params = Q.quantize(model, loaded.params, quant)
    del loaded
    size = nbytes(params)
  else:
    m = inference.load(path, dtype="bfloat16", quant=quant if kind == "stream" else None)
    size = nbytes(m.params)
  print(vm_hwm(), size)


EXTRA_ENV: dict[str, str] = {}


def measure(kind: str, path: str, quant: str) -> tuple[int, int]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TQDM_DISABLE="1", **EXTRA_ENV)
  res = subprocess.run([sys.executable, __file__, "--child", kind, "--path", path, "--quant", quant], env=env,
                       capture_output=True, text=True, cwd=ROOT)
  if res.returncode:
    raise SystemExit(f"{kind}: exit {res.returncode}\n{res.stderr[-3000:]}")
  hwm, size = map(int, res.stdout.split()[-2:])
  return hwm, size


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quant", default="int8", choices=("int8", "int4"))
  p.add_argument("--keep", default=None, help="build the checkpoints here and keep them (default: a temp dir)")
  p.add_argument("--all", action="store_true", help="also the bf16 load and the whole-tree quantization")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the measured processes")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--path", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    return child(a.child, a.path, a.quant)
  EXTRA_ENV.update(kv.split("=", 1) for kv in a.env)
  root = a.keep or tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR"))
  bf16, qdir = os.path.join(root, "bf16"), os.path.join(root, a.quant)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TQDM_DISABLE="1")
  if not os.path.isdir(bf16):
    subprocess.run([sys.executable, "-c", f"from bench.quant_memory import build; build({bf16!r})"], env=env,
                   cwd=ROOT, check=True, capture_output=True)
  if not os.path.isdir(qdir):
    subprocess.run([sys.executable, "-m", "llamavid_jax.quant", "save", "--ckpt", bf16, "--quant", a.quant,
                    "--out", qdir, "--dtype", "bfloat16"], env=env, cwd=ROOT, check=True, capture_output=True)
  disk = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
  mib = 2**20
  print(f"7B slice checkpoints in {root}: bf16 params {disk(os.path.join(bf16, 'params')) / mib:.0f} MiB on disk, "
        f"{a.quant} params {disk(os.path.join(qdir, 'params')) / mib:.0f} MiB on disk", flush=True)
  floor, _ = measure("floor", bf16, a.quant)
  print(f"floor (imports + tokenizers): peak {floor / mib:.0f} MiB", flush=True)
  kinds = (("bf16", bf16), ("whole", bf16)) if a.all else ()
  for kind, path in kinds + (("stream", bf16), ("stored", qdir)):
    hwm, n = measure(kind, path, a.quant)
    ref = f"{n / mib:.0f} MiB of parameters"
    if kind != "bf16":
      ref += f"; peak = {hwm / n:.2f} x them, less the floor {(hwm - floor) / n:.2f} x"
    print(f"{kind:>6}: peak {hwm / mib:.0f} MiB (less the floor {(hwm - floor) / mib:.0f} MiB), {ref}", flush=True)
  if not a.keep:
    import shutil
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
