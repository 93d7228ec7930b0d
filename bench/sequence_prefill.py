"""A long movie prompt prefilled with the LLM length split over `sequence`, against one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python bench/sequence_prefill.py --ckpt WORKDIR/inference [--frames 32] [--steps 4]

Writes a movie feature file of `--frames` random frames with a subtitle line each (the
release's format), asks one question, and for one device and for each mesh (tensor 2 x
sequence 4, sequence 8) prints: the spliced prompt length, the KV cache's length and its
sharding, max |delta| of the prefill's next-token logits (float32) against one device,
whether `--steps` greedy ids are equal, and the shapes of every all-gather in the
compiled decode chunk (no KV-cache-shaped one: no slot moves). Measured (CPU, 8 fake
devices, the tests' tiny checkpoint, 32 frames = 288 positions, 4 steps): max |delta
logits| 5.22e-08 on both meshes, greedy ids equal; cache (2, 1, 296, 2, 8) with
P(None, None, 'sequence', 'tensor') on tensor 2 x sequence 4 (one device: 292 slots),
(2, 1, 304, 2, 8) with P(None, None, 'sequence') on sequence 8; decode all-gathers
f32[1,2], f32[2,8,32], f32[32,32], s32[1,2] (tensor 2 x sequence 4) and f32[4,8,32],
f32[64,32] (sequence 8): parameter slices and [B, 2] values, none of the cache.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np

from llamavid_jax import generate as G
from llamavid_jax import inference, sharding
from llamavid_jax.data.features import Movie, write_safetensors

MESHES = ({"tensor": 2, "sequence": 4}, {"sequence": 8})


def movie_request(m: inference.Model, frames: int, folder: str):
  n, c = m.cfg.vision.num_tokens, m.cfg.vision.width
  path = os.path.join(folder, "movie.safetensors")
  feats = np.random.default_rng(0).standard_normal((frames, n, c)).astype(np.float16)
  write_safetensors(path, Movie(feats, "".join(f"<image>line {i} says hello." for i in range(frames))))
  req = m.request("What happens in the movie?", m.media(features=path))
  return req, m._batch([req], None, None)


def prefill_and_decode(m: inference.Model, req: dict, batch: dict, steps: int):
  """On m's mesh -> (S', next-token logits float32[1, V] of the prefill, its cache,
  `steps` greedy ids int32[1, steps]). tests/test_inference_shard.py uses it too."""
  model = m.model_for([req])
  with m.on_mesh():
    s = G.prompt_length(model, batch)
    max_len = G.split_cache(model.cfg, s, steps) or s + steps
    logits, cache = jax.jit(lambda p: model.apply({"params": p}, **batch, max_len=max_len,
                                                  method="prefill_cache"))(m.params)
    ids = G.generate(model, m.params, batch, max_new_tokens=steps, eos_id=-1, chunk=steps)
  return s, np.asarray(logits), cache, ids


def run(m: inference.Model, req: dict, batch: dict, steps: int):
  """-> (S', logits float32[1, V], cache, greedy ids int32[1, steps], all-gather shapes of the decode chunk)."""
  s, logits, cache, ids = prefill_and_decode(m, req, batch, steps)
  model = m.model_for([req])
  max_len = cache["k"].shape[2]
  with m.on_mesh():
    state = G._prefill_jit(model, m.params, batch, max_len, 0)
    hlo = G._decode_jit.lower(model, m.params, state, jax.random.key(0), jax.numpy.int32(0), steps, -1, 0.0, 0,
                              1.0).compile().as_text()
  gathers = sorted({ln.split("=", 1)[1].split("all-gather")[0].strip() for ln in hlo.splitlines()
                    if "all-gather(" in ln or "all-gather-start(" in ln})
  return s, logits, cache, ids, gathers


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True, help="an inference directory (or converted / WORKDIR)")
  p.add_argument("--frames", type=int, default=32)
  p.add_argument("--steps", type=int, default=4)
  a = p.parse_args()
  m1 = inference.load(a.ckpt)
  with tempfile.TemporaryDirectory() as d:
    req, batch = movie_request(m1, a.frames, d)
  s, want, cache, want_ids, _ = run(m1, req, batch, a.steps)
  print(f"one device: {s} spliced positions, cache {tuple(cache['k'].shape)}, greedy ids {want_ids.tolist()}")
  for shape in MESHES:
    ms = inference.load(a.ckpt, mesh=sharding.make_mesh(shape))
    _, logits, cache, ids, gathers = run(ms, req, batch, a.steps)
    print(f"{shape}: max |delta logits| {np.abs(logits - want).max():.3g}, greedy ids equal "
          f"{bool((ids == want_ids).all())}, cache {tuple(cache['k'].shape)} {cache['k'].sharding.spec}, "
          f"decode all-gathers {gathers}")


if __name__ == "__main__":
  main()
