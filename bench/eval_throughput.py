"""Questions per second of the video-QA benchmark path (eval.run msvd_qa's predictor).

  PYTHONPATH=. python bench/eval_throughput.py --ckpt workdir/demo/context/inference \
      --data workdir/demo/data [--batch_sizes 1,8] [--limit 64] [--max_new_tokens 8]

Reads DATA/heldout_qa.json (the synthetic generator's MSVD-QA-format held-out file)
through `eval.benchmarks.video_qa`, and for each batch size answers the first `limit`
questions with `eval.predict.Predictor` (greedy): once to compile (not timed), then
timed. Prints questions/s and seconds per batch size; the time includes decoding the
videos on the host, as a benchmark run does.
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

_CKPT = flags.DEFINE_string("ckpt", None, "inference directory or train WORKDIR", required=True)
_DATA = flags.DEFINE_string("data", "workdir/demo/data", "synthetic data folder (heldout_qa.json, videos/)")
_BATCH = flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes to time")
_LIMIT = flags.DEFINE_integer("limit", 64, "questions per timed pass")
_TOKENS = flags.DEFINE_integer("max_new_tokens", 8, "new tokens per answer")


def main(argv):
  del argv
  from eval.benchmarks import BENCHMARKS
  from eval.predict import Predictor
  from llamavid_jax import inference
  mod = BENCHMARKS["msvd_qa"]
  args = argparse.Namespace(question_file=os.path.join(_DATA.value, "heldout_qa.json"), gt_file=None,
                            video_folder=os.path.join(_DATA.value, "videos"), video_prefix=None, benchmark="msvd_qa")
  items = mod.load(args)[:_LIMIT.value]
  m = inference.load(_CKPT.value)
  for b in map(int, _BATCH.value):
    p = Predictor(m, batch_size=b, max_new_tokens=_TOKENS.value)
    p.predict(items[:b])                       # compile
    t = time.perf_counter()
    preds = p.predict(items)
    dt = time.perf_counter() - t
    acc = sum(x.strip().lower() == it.meta["answer"].lower() for x, it in zip(preds, items)) / len(items)
    print(f"batch {b}: {len(items) / dt:.2f} questions/s ({len(items)} questions, {dt:.1f}s, "
          f"exact {acc:.3f})", flush=True)


if __name__ == "__main__":
  app.run(main)
