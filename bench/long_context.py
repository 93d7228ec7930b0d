"""Memory and time of one training forward + backward at long sequence lengths.

  python bench/long_context.py [--seq-lens 8192,16384,32768,65536] [--json]

The model is the tiny-width LLaMA-VID LLM (2 layers, width 128, 4 heads, Vicuna's
32000-token vocabulary) with `attention_impl="chunked"` and the training loss
(`train/step.py: loss_sums`, logits in chunks), on a text-only sequence of each
length. Every length runs in a fresh process, so each peak RSS is that length's own.
Prints, per length: peak RSS, seconds (compile and run), and the attention FLOPs the
chunked kernel executes (its query tiles x the key blocks each can see) against the
dense count and the causal minimum.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "16384", "32768", "65536"], "LLM sequence lengths")
_JSON = flags.DEFINE_bool("json", False, "one JSON object per length (seq_len, peak_rss_bytes, seconds, ...)")
_ONE = flags.DEFINE_integer("one", 0, "internal: measure this length in this process")

D_MODEL, LAYERS, HEADS, VOCAB = 128, 2, 4, 32000


def attention_work(seq_len: int, block: int) -> dict[str, int]:
  """Query-key pairs per layer and head: executed by the chunked kernel's schedule, dense, causal."""
  import numpy as np
  from llamavid_jax.ops.attention import visible_blocks
  tiles = -(-seq_len // block)
  keys = np.arange(tiles * block)[None]
  executed = sum(int(visible_blocks((j + 1) * block - 1, keys, block)) * block * block for j in range(tiles))
  return dict(executed=executed, dense=seq_len * seq_len, causal=seq_len * (seq_len + 1) // 2)


def measure(seq_len: int) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  from configs import common
  from llamavid_jax.models import LlamaVid
  from llamavid_jax.models.config import from_dict
  from llamavid_jax.ops.attention import BLOCK
  from train import step as S

  cfg = from_dict(dict(common.TINY, llm=dict(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS,
                                             num_kv_heads=HEADS, mlp_dim=2 * D_MODEL, max_positions=seq_len),
                       attention_impl="chunked", remat_policy="nothing_saveable"))
  model = LlamaVid(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, (1, seq_len)).astype(np.int32)
  batch = dict(input_ids=ids, labels=ids, text_mask=np.ones((1, seq_len), bool), frame_mask=np.ones((1, 0), bool),
               qformer_ids=np.ones((1, 1, 4), np.int32), qformer_mask=np.ones((1, 1, 4), bool),
               frames=np.zeros((1, 0, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32))
  small = {k: v[:, :8] if k in ("input_ids", "text_mask") else v for k, v in batch.items() if k != "labels"}
  params = jax.jit(model.init)(jax.random.key(0), **small)["params"]
  step = jax.jit(jax.value_and_grad(lambda p, b: S.loss_sums(model, p, b)[0]))
  t0 = time.perf_counter()
  compiled = step.lower(params, batch).compile()
  t1 = time.perf_counter()
  loss, grads = compiled(params, batch)
  jax.block_until_ready(grads)
  t2 = time.perf_counter()
  work = attention_work(seq_len, BLOCK)
  return dict(seq_len=seq_len, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              seconds=round(t2 - t0, 2), compile_seconds=round(t1 - t0, 2), run_seconds=round(t2 - t1, 2),
              temp_bytes=compiled.memory_analysis().temp_size_in_bytes, loss=float(loss) / seq_len,
              attention_executed_over_dense=work["executed"] / work["dense"],
              attention_executed_over_causal=work["executed"] / work["causal"])


def main(argv):
  del argv
  if _ONE.value:
    print(json.dumps(measure(_ONE.value)), flush=True)
    return
  rows = []
  for s in (int(x) for x in _SEQ_LENS.value):
    p = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={s}"], capture_output=True, text=True)
    if p.returncode:
      raise SystemExit(f"length {s} failed:\n{p.stderr[-3000:]}")
    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    if _JSON.value:
      print(json.dumps(r), flush=True)
    else:
      print(f"S={s:>7}: peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB, XLA temporaries "
            f"{r['temp_bytes'] / 2**30:6.2f} GiB, {r['seconds']:7.1f} s (compile {r['compile_seconds']:.1f} s), "
            f"attention executed / dense {r['attention_executed_over_dense']:.3f}, "
            f"/ causal minimum {r['attention_executed_over_causal']:.3f}", flush=True)
  if len(rows) > 1 and not _JSON.value:
    a, b = rows[0], rows[-1]
    growth = (b["peak_rss_bytes"] / a["peak_rss_bytes"]) / (b["seq_len"] / a["seq_len"])
    print(f"peak RSS growth {a['seq_len']} -> {b['seq_len']}: {b['peak_rss_bytes'] / a['peak_rss_bytes']:.2f}x "
          f"for {b['seq_len'] // a['seq_len']}x the length ({growth:.2f}x of linear)")


if __name__ == "__main__":
  app.run(main)
