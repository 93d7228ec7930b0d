"""Generation speed and prefill memory.

  python bench/generate.py [--dtype float32] [--steps 16] [--skip_7b]
  python bench/generate.py --kv_int8 [--dtype bfloat16] [--skip_7b]
  python bench/generate.py --decode fp32,bf16,int8,int4 [--steps 4] [--repeats 2] [--skip_7b]

1. peak RSS (ru_maxrss) of a 16K-token prompt (8192 frames x 2 tokens) on the tiny model,
   prefilled in chunks of 1K positions versus at once, each in a fresh subprocess,
2. decode tokens/s at batch 1 and 8 (the scanned decode chunk alone, after warm-up) for
   the tiny model (configs/tiny.py) and a 7B-shaped 2-layer slice (d_model 4096, 32
   heads, mlp 11008, vocab 32000; tiny vision towers, precomputed features in),
3. prefill seconds per 1K visual tokens (512 frames x 2 tokens, batch 1) for both.

`--quant_bytes`: only the device-resident bytes of the 7B-shaped 2-layer slice's
parameters in bf16, int8 and int4 (llamavid_jax/quant.py, the embedding table quantized
too), summed over the arrays as placed (`on_device_size_in_bytes`, equal to `nbytes`),
and first whether int4 is held packed. Measured (CPU): 667M LLM parameters, bf16 1272
MiB (embedding table 250 MiB); int8 636 MiB = 0.500x bf16 (whole model 0.513x); int4
0.507x by `nbytes`, which on the CPU counts an int4 element as a byte, but the CPU holds
int4 packed (an int4 array of 256M elements: nbytes 256 MiB, the process grew 131 MiB),
so what it holds is 0.257x (whole model 0.276x), the bytes at 4 bits an element. Before
the table was quantized: int8 0.598x, int4 0.604x (0.403x at 4 bits).

`--kv_int8`: the int8 KV cache (`kv_cache="int8"`, models/llama.py `cache_spec`) against
the `--dtype` cache, for the tiny model (LLM init std 0.15, so that its next-token
distributions are peaked) and the 7B slice: the cache's bytes, and the log-probs of
the full-precision cache's greedy tokens, teacher-forced through prefill + `--steps`
decode steps on 4 left-padded prompts of 8 frames and 32 text ids, with either cache.
Measured (CPU, --steps 16, 64 tokens): tiny fp32 0.375x the bytes, mean |delta log p|
0.0029, max 0.0103, greedy ids equal in 3 of 4 rows (the 4th parts at token 6); tiny
bf16 0.750x (Dh 8), 0.0071 / 0.0424; 7B slice fp32 0.258x (1056 vs 4096 MiB for a
32-layer row of 4096 positions), 0.0200 / 0.0721; 7B slice bf16 0.516x (1056 vs 2048
MiB), 0.0223 / 0.0799 (log p -5.9 +- 0.4: flat random distributions, greedy ids part
after 2-8 tokens in some rows).

`--decode MODES`: only a decode table of the 7B slice (`--skip_7b`: the tiny model), after
the machine's memory bandwidth measured in the same run (`bandwidth`: a STREAM-like copy
of 512 MiB, best of 5, with numpy and with jax, and a jax sum; the bound takes the
best). Per mode (`DECODE_MODES`: compute dtype, Qwix weight quant as `inference.load`'s
`quant=`, KV cache; parameters stored in the compute dtype, as `inference.load` casts
them) and batch 1 and 8: the bytes a decode step reads (`decode_bytes`: the LLM's weights
but the embedding table, int4 at 4 bits; the whole cache as allocated), the measured
tokens/s of a compiled decode chunk of `--steps` tokens (best of `--repeats`, compile and
a warm-up chunk excluded) and the bound B x bandwidth / (weights + cache bytes).
Measured (python bench/generate.py --decode fp32,bf16,int8,int4 --steps 4 --repeats 2;
2-core dev CPU shared with four other jobs, load average 10.7 at the start, 12.8 at the
end, so every figure is a fraction of two cores and moves 2x between runs):
  memory bandwidth: numpy copy 7.1 GB/s, jax copy 1.2 GB/s, jax read 3.6 GB/s (an earlier
  run, load 12.4: 11.9 / 3.8 / 9.1 GB/s); the bound below uses 7.1 GB/s
  mode  dtype     weights MiB  batch  cache MiB  tokens/s  bound tok/s  of bound
  fp32  float32          2044      1        3.7      0.43          3.3     0.130
  fp32  float32          2044      8       29.5      1.70         26.2     0.065
  bf16  bfloat16         1022      1        1.8      0.26          6.6     0.039
  bf16  bfloat16         1022      8       14.8      1.06         52.4     0.020
  int8  float32           512      1        3.7      0.51         13.2     0.039
  int8  float32           512      8       29.5      1.92        100.4     0.019
  int4  float32           271      1        3.7      0.52         24.8     0.021
  int4  float32           271      8       29.5      1.51        181.0     0.008
  (the earlier run, 11.9 GB/s bound: fp32 0.40 / 1.38, int8 0.46 / 1.86, int4 0.32 / 1.76
  tokens/s at batch 1 / 8). On this CPU decoding is compute-bound, not bandwidth-bound:
  bf16 matmuls are slower than fp32 on it, and Qwix's weight-only int8 / int4 read 4x /
  7.5x fewer weight bytes but are no faster than fp32 here. No GPU was lent to this
  measurement.

Measured on the 2-core dev CPU, fp32 (best of 3; tiny figures swing 2-5x with the shared
cores): 16K prompt peak RSS 1.29 GiB in 1K chunks, 14.80 GiB at once (0.46 before);
tiny decode 10.4K tokens/s at batch 1, 75K at 8, prefill 0.054 s / 1K visual tokens;
7B slice decode 2.0 tokens/s at batch 1, 8.0 at 8, prefill 8.0 s / 1K visual tokens.
"""

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from configs import tiny
from llamavid_jax import generate as G
from llamavid_jax import quant as Q
from llamavid_jax.models import LlamaVid
from llamavid_jax.models.config import LlmConfig
from llamavid_jax.models.llama import KV_ARRAYS, cache_spec

SLICE_7B = LlmConfig(vocab_size=32000, d_model=4096, num_layers=2, num_heads=32, num_kv_heads=32, mlp_dim=11008)


def model_and_params(kind: str, dtype: str, std: float | None = None):
  """std: the LLM's init std (None: the config's)."""
  cfg = tiny.model_config()
  if kind == "7b-slice":
    cfg = dataclasses.replace(cfg, llm=SLICE_7B)
  if std is not None:
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, initializer_range=std))
  model = LlamaVid(dataclasses.replace(cfg, dtype=dtype, remat_policy="none"))
  params = jax.jit(model.init)(jax.random.key(0), **batch(cfg, 1, 1, 8))["params"]
  return model, nn.unbox(params)


def batch(cfg, b: int, frames: int, text: int) -> dict:
  """b requests of `text` ids with one <image> over `frames` feature frames, left padded."""
  rng = np.random.default_rng(0)
  n1, c = cfg.input_spec.feature_shape
  reqs = []
  for _ in range(b):
    ids = rng.integers(3, cfg.llm.vocab_size, text).astype(np.int32)
    ids[0], ids[1] = 1, cfg.image_token_id
    reqs.append(dict(input_ids=ids, features=rng.standard_normal((frames, n1, c), np.float32),
                     qformer_ids=np.ones(8, np.int32), qformer_mask=np.ones(8, bool)))
  return G.batch_requests(reqs, text_buckets=[text], frame_buckets=[frames])


def timed(fn, *args, repeats: int = 3) -> float:
  """Best of `repeats` wall seconds after a compile + warm-up call (the 2 dev cores are shared)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def decode_state(model, params, b: int, steps: int, repeats: int = 3):
  """The prefilled (logits, cache, done) of b prompts (8 frames, 32 text ids), with room
  for the `steps` tokens of `repeats` + 1 decode chunks (`decode_rate`'s)."""
  x = batch(model.cfg, b, 8, 32)
  return G._prefill_jit(model, params, x, G.prompt_length(model, x) + (repeats + 1) * steps, 0)


def decode_rate(model, params, b: int, steps: int, repeats: int = 3, state=None) -> float:
  """Tokens/s of the scanned decode chunk of `steps` tokens alone: best of `repeats`
  chunks after a compile + warm-up chunk, each continuing the last (the state is
  donated to the chunk: `generate._decode_jit`)."""
  state = [decode_state(model, params, b, steps, repeats) if state is None else state]

  def chunk(i: int):
    state[0] = G._decode_jit(model, params, state[0], jax.random.key(0), jnp.int32(i * steps), steps, -1, 0.0, 0,
                             1.0)[0]
    return state[0]

  jax.block_until_ready(chunk(0))
  times = []
  for i in range(1, repeats + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(chunk(i))
    times.append(time.perf_counter() - t0)
  return b * steps / min(times)


def bandwidth(mib: int = 512, repeats: int = 5) -> dict[str, float]:
  """The machine's memory bandwidth, bytes/s, best of `repeats` (STREAM's way: a copy
  counts the bytes read and the bytes written): `numpy copy` (np.copyto of `mib` MiB of
  float32), `jax copy` (jit x + 1, read + write) and `jax read` (jit sum, bytes read)."""
  n = mib * 2**20 // 4
  src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
  x = jax.device_put(src)
  add, total = jax.jit(lambda a: a + 1.0), jax.jit(jnp.sum)
  out = {"numpy copy": 2 * src.nbytes / timed(lambda: np.copyto(dst, src), repeats=repeats),
         "jax copy": 2 * x.nbytes / timed(add, x, repeats=repeats),
         "jax read": x.nbytes / timed(total, x, repeats=repeats)}
  del src, dst, x
  return out


DECODE_MODES = {   # name -> (compute dtype, quant, kv_cache)
    "fp32": ("float32", None, None), "bf16": ("bfloat16", None, None),
    "int8": ("float32", "int8", None), "int4": ("float32", "int4", None),
    "int8-bf16": ("bfloat16", "int8", None), "int4-bf16": ("bfloat16", "int4", None),
    "bf16+kv-int8": ("bfloat16", None, "int8"), "fp32+kv-int8": ("float32", None, "int8")}


def decode_bytes(params, cache) -> tuple[int, int]:
  """(weight bytes, KV cache bytes) one decode step reads: every LLM parameter but the
  embedding table (a lookup reads B of its rows), int4 counted at 4 bits an element (as
  the CPU holds it packed; `quant.param_bytes`), and the cache's arrays as allocated
  (attention reads every slot, masked or not)."""
  llm = {k: v for k, v in params["llm"].items() if k != "embed_tokens"}
  return Q.param_bytes(llm), Q.param_bytes({k: cache[k] for k in cache if k in KV_ARRAYS})


def decode_table(kind: str, modes: list[str], steps: int, repeats: int) -> None:
  """Decode tokens/s at batch 1 and 8 per mode, each against the bandwidth bound
  B x bandwidth / (weight bytes + B rows of cache bytes) a step reads."""
  bw = bandwidth()
  best = max(bw.values())
  print("memory bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items())
        + f"; bound below uses {best / 1e9:.1f} GB/s", flush=True)
  print(f"{'mode':<13} {'dtype':<9} {'weights MiB':>11} {'batch':>5} {'cache MiB':>9} {'tokens/s':>9} "
        f"{'bound tok/s':>11} {'of bound':>8}", flush=True)
  for mode in modes:
    dtype, quant, kv = DECODE_MODES[mode]
    model, params = model_and_params(kind, dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), params)   # stored in the compute dtype, as inference.load
    if kv:
      model = model.clone(cfg=dataclasses.replace(model.cfg, kv_cache=kv))
    if quant:
      model, params = Q.quantize(model, params, quant)
    for b in (1, 8):
      state = decode_state(model, params, b, steps, repeats)
      w, c = decode_bytes(params, state[1])
      rate = decode_rate(model, params, b, steps, repeats, state)
      bound = b * best / (w + c)
      print(f"{mode:<13} {dtype:<9} {w / 2**20:>11.1f} {b:>5} {c / 2**20:>9.1f} {rate:>9.2f} {bound:>11.1f} "
            f"{rate / bound:>8.3f}", flush=True)
      del state
    del model, params


def prefill_per_1k(model, params) -> float:
  x = batch(model.cfg, 1, 512, 16)
  s = G.prompt_length(model, x)
  return timed(lambda: G._prefill_jit(model, params, x, s, 0)) / (512 * model.cfg.tokens_per_frame / 1000)


def rss_child(chunk: int, dtype: str) -> None:
  model, params = model_and_params("tiny", dtype)
  x = batch(model.cfg, 1, 8192, 16)
  s = G.prompt_length(model, x)
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  jax.block_until_ready(G._prefill_jit(model, params, x, s, chunk))
  print(s, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rss(chunk: int, dtype: str) -> tuple[int, float, float]:
  out = subprocess.run([sys.executable, __file__, "--rss_chunk", str(chunk), "--dtype", dtype], check=True,
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.split()
  s, base, peak = map(int, out[-3:])
  return s, base / 2**20, peak / 2**20                   # ru_maxrss is KiB on Linux -> GiB


def kv_int8(kind: str, dtype: str, steps: int) -> None:
  """The int8 KV cache against the `dtype` cache: bytes, log-prob deltas, greedy ids."""
  model, params = model_and_params(kind, dtype, std=0.15 if kind == "tiny" else None)
  q = model.clone(cfg=dataclasses.replace(model.cfg, kv_cache="int8"))
  llm, full = model.cfg.llm, dataclasses.replace(model.cfg.llm, num_layers=32)
  size = lambda c, kv: sum(a.size * a.dtype.itemsize for a in cache_spec(c, 1, 4096, dtype, kv).values())
  x = batch(model.cfg, 4, 8, 32)
  teacher = G.generate(model, params, x, max_new_tokens=steps, eos_id=-1)
  want = G.teacher_logprobs(model, params, x, teacher)
  got = G.teacher_logprobs(q, params, x, teacher)
  ids = G.generate(q, params, x, max_new_tokens=steps, eos_id=-1)
  same = (ids == teacher).cumprod(1).sum(1)        # leading ids equal, per row
  d = np.abs(got - want)
  print(f"{kind} ({dtype}, {llm.num_layers} layers, K={llm.num_kv_heads}, Dh={llm.head_dim}): int8 KV cache "
        f"{size(llm, 'int8') / size(llm, None):.3f} x the {dtype} cache's bytes "
        f"(32 layers x 4096 positions: {size(full, 'int8') / 2**20:.0f} vs {size(full, None) / 2**20:.0f} MiB a row); "
        f"teacher-forced decode over {d.size} tokens (log p {want.mean():.2f} +- {want.std():.2f}): "
        f"mean |delta log p| {d.mean():.5f}, max {d.max():.5f}; greedy ids equal for the first "
        f"{same.tolist()} of {steps} tokens", flush=True)


def int4_probe() -> str:
  """Whether the backend holds int4 packed: an int4 array of 256M elements made on the
  device, its `nbytes` / `on_device_size_in_bytes()` against what this process's
  resident memory grew by (on the CPU the device memory is the process's)."""
  rss = lambda: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
  jax.block_until_ready(jnp.zeros(4, jnp.int4))
  before = rss()
  a = jax.block_until_ready(jax.jit(lambda: jnp.full((256, 1 << 20), 3, jnp.int4))())
  grew = rss() - before
  return (f"{jax.default_backend()}: an int4 array of 256M elements: nbytes {a.nbytes >> 20} MiB, "
          f"on_device_size_in_bytes {a.on_device_size_in_bytes() >> 20} MiB, resident memory grew {grew >> 20} MiB"
          + (" (held packed, 4 bits an element)" if jax.default_backend() == "cpu" and grew < a.nbytes * 0.6 else ""))


def quant_bytes() -> None:
  """Device bytes of the 7B slice's parameters: bf16 (the baseline), int8, int4, summed
  over the leaves' arrays as placed (`on_device_size_in_bytes`; `nbytes` agrees)."""
  print(int4_probe(), flush=True)   # first: later, freed memory is reused without growing the process
  model, params = model_and_params("7b-slice", "bfloat16")
  params = jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16), params)   # on the host, as a loaded checkpoint
  on_device = lambda t: sum(a.on_device_size_in_bytes() for a in jax.tree.leaves(t))
  nbytes = lambda t: sum(a.nbytes for a in jax.tree.leaves(t))
  base = jax.tree.map(jax.device_put, params)
  ref, ref_all = on_device(base["llm"]), on_device(base)
  emb = on_device(base["llm"]["embed_tokens"])
  del base
  print(f"7B slice LLM ({sum(a.size for a in jax.tree.leaves(params['llm'])) / 1e6:.0f}M parameters): "
        f"bf16 {ref / 2**20:.0f} MiB (embedding table {emb / 2**20:.0f} MiB); whole model {ref_all / 2**20:.0f} MiB",
        flush=True)
  for mode in Q.QUANTS:
    _, qp = Q.quantize(model, params, mode)
    got, got_all = on_device(qp["llm"]), on_device(qp)
    assert got == nbytes(qp["llm"]), (got, nbytes(qp["llm"]))
    print(f"  {mode}: LLM {got / 2**20:.0f} MiB on device = {got / ref:.3f} x bf16 (whole model "
          f"{got_all / ref_all:.3f} x); at 4 bits an int4 element (as held packed) {Q.param_bytes(qp['llm']) / ref:.3f} x "
          f"(whole model {Q.param_bytes(qp) / ref_all:.3f} x)", flush=True)
    del qp


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--skip_7b", action="store_true")
  ap.add_argument("--rss_chunk", type=int, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--quant_bytes", action="store_true", help="only the quantized parameter bytes of the 7B slice")
  ap.add_argument("--kv_int8", action="store_true", help="only the int8 KV cache's bytes and log-prob deltas")
  ap.add_argument("--decode", default=None, metavar="MODE[,MODE]",
                  help=f"only the decode table of the 7B slice (--skip_7b: the tiny model) for these modes: "
                       f"{', '.join(DECODE_MODES)}, against the measured bandwidth")
  ap.add_argument("--repeats", type=int, default=3, help="--decode: best of this many timed calls")
  a = ap.parse_args()
  if a.decode:
    modes = a.decode.split(",")
    bad = [m for m in modes if m not in DECODE_MODES]
    if bad:
      ap.error(f"--decode: unknown modes {bad} (known: {', '.join(DECODE_MODES)})")
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()}; decode chunk of {a.steps} tokens, best of {a.repeats}", flush=True)
    decode_table("tiny" if a.skip_7b else "7b-slice", modes, a.steps, a.repeats)
    print(f"load average at the end {os.getloadavg()}")
    return
  if a.quant_bytes:
    return quant_bytes()
  if a.kv_int8:
    for kind in ("tiny",) + (() if a.skip_7b else ("7b-slice",)):
      kv_int8(kind, a.dtype, a.steps)
    return
  if a.rss_chunk is not None:
    return rss_child(a.rss_chunk, a.dtype)
  print(f"backend {jax.default_backend()}, {a.dtype}")
  # first, while this process is small: a child's ru_maxrss starts at its parent's peak (Linux keeps it over exec)
  for chunk in (1024, 0):
    s, base, peak = rss(chunk, a.dtype)
    print(f"tiny, {s}-position prompt prefilled {f'in chunks of {chunk}' if chunk else 'at once'}: "
          f"peak RSS {peak:.2f} GiB (before prefill {base:.2f} GiB)", flush=True)
  for kind in ("tiny",) + (() if a.skip_7b else ("7b-slice",)):
    model, params = model_and_params(kind, a.dtype)
    rates = ", ".join(f"batch {b}: {decode_rate(model, params, b, a.steps):.1f}" for b in (1, 8))
    print(f"{kind}: decode tokens/s {rates}; prefill {prefill_per_1k(model, params):.3f} s per 1K visual tokens",
          flush=True)

if __name__ == "__main__":
  main()
