"""Compile time of the tiny LLaMA-VID forward and backward at several depths.

Layer stacks are nn.scan'ned, so compile time must not grow with depth.
  python bench/compile_time.py [--depths 2 8 32]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from llamavid_jax.models import LlamaVid, splice_labels
from llamavid_jax.models import config as C


def batch_for(cfg, b=2, t=3, s=16, l=6):
  rng = np.random.RandomState(0)
  ids = rng.randint(3, cfg.llm.vocab_size, (b, s)).astype(np.int32)
  ids[:, 4] = cfg.image_token_id
  return dict(input_ids=ids, text_mask=np.ones((b, s), bool), frame_mask=np.ones((b, t), bool),
              qformer_ids=np.ones((b, l), np.int32), qformer_mask=np.ones((b, l), bool),
              frames=rng.randn(b, t, cfg.vision.image_size, cfg.vision.image_size, 3).astype(np.float32))


def compile_seconds(depth: int) -> tuple[float, float]:
  m = tiny.get_config().model
  m.llm.num_layers = m.vision.depth = m.qformer.num_layers = depth
  cfg = C.from_dict(m)
  model, batch = LlamaVid(cfg), batch_for(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), **batch)["params"]

  def loss(p, batch):
    logits, out = model.apply({"params": p}, **batch)
    y = splice_labels(jnp.asarray(batch["input_ids"]).clip(0), out["layout"])[:, 1:]
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, jnp.maximum(y, 0)[..., None], -1))

  times = []
  for fn in (jax.jit(lambda p, b: model.apply({"params": p}, **b)[0]), jax.jit(jax.grad(loss))):
    t0 = time.perf_counter()
    fn.lower(params, batch).compile()
    times.append(time.perf_counter() - t0)
  return times[0], times[1]


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--depths", type=int, nargs="+", default=[2, 8])
  args = ap.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  print("depth  forward_compile_s  grad_compile_s")
  for d in args.depths:
    f, g = compile_seconds(d)
    print(f"{d:5d}  {f:17.2f}  {g:14.2f}")
