"""Train-step throughput of a config on random in-memory batches (no data pipeline).

  python bench/train_step.py --config configs/demo.py [--config.batch_size=64] [--steps 20]

Prints compile time, step time, tokens/s and, where the device's peak is known (or
--config.log.peak_tflops is given), MFU from train/metrics.py's FLOP count.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py:toy", "config file[:arg]")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps (after one compile step)")


def main(_):
  from llamavid_jax.models import spliced_length
  from train import metrics, optim
  from train.toy_data import ToyBatches
  from train.train import build
  c = _CONFIG.value
  d = c.data
  b = build(c)
  state = b.init(c.seed)
  data = ToyBatches(b.model_cfg, c.batch_size, d.text_len, d.num_frames, d.qformer_len, d.use_features,
                    seed=c.seed, process_index=jax.process_index(), process_count=jax.process_count())
  t = time.perf_counter()
  state, m = b.trainer(state, next(data))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  tokens = 0
  t = time.perf_counter()
  for _ in range(_STEPS.value):
    state, m = b.trainer(state, next(data))
    tokens += int(m["tokens"])
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t) / _STEPS.value
  trains = {k: any(l == optim.TRAINABLE for l in jax.tree.leaves(v)) for k, v in b.labels.items()}
  flops = metrics.flops_per_step(b.model_cfg, c.batch_size, d.text_len, d.num_frames, d.qformer_len,
                                 d.use_features, trains)
  peak = metrics.peak_flops_per_device(c.log.get("peak_tflops"))
  s_llm = spliced_length(d.text_len, d.num_frames, b.model_cfg.tokens_per_frame)
  print(f"devices {jax.device_count()} ({jax.devices()[0].device_kind}) mesh {dict(b.mesh.shape)}")
  print(f"batch {c.batch_size} x {s_llm} LLM positions, accum {c.accum_steps}; compile+first step {compile_s:.1f}s")
  print(f"step_time {dt * 1e3:.1f} ms  target tokens/s {tokens / _STEPS.value / dt:.0f}  "
        f"LLM positions/s {c.batch_size * s_llm / dt:.0f}  model TFLOP/step {flops / 1e12:.4f}  "
        f"achieved TFLOP/s {flops / dt / 1e12:.3f}" + (f"  MFU {flops / dt / (peak * jax.device_count()):.1%}"
                                                     if peak else "  MFU n/a (unknown peak: --config.log.peak_tflops)"))


if __name__ == "__main__":
  app.run(main)
