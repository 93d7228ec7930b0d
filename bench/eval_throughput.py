"""Questions per second of the video-QA benchmark path (eval.run msvd_qa's predictor),
with the benchmark's own defaults and with a short token budget.

  PYTHONPATH=. python bench/eval_throughput.py --ckpt workdir/demo/context/inference \
      --data workdir/demo/data [--batch_sizes 8,1] [--limit 200] [--max_new_tokens 8] [--out preds.json]

Reads DATA/heldout_qa.json (the synthetic generator's MSVD-QA-format held-out file)
through `eval.benchmarks.video_qa`, and for each batch size answers the first `limit`
questions with `eval.predict.Predictor` (greedy) twice: as `eval.run` does without
--max-new-tokens (the benchmark's budget, `GENERATION["max_new_tokens"]`: the release's
1024, cut per question to what the model's positions leave: `fit_max_new_tokens`) and
with `max_new_tokens`; each once untimed (to compile every shape the questions need),
then timed. Prints questions/s of both with the load average beside each (the box is
shared), and whether the two budgets' predictions are identical. The time includes
decoding the videos on the host, as a benchmark run does. `--out` writes the
predictions (for comparing two checkouts: run this file with the other's PYTHONPATH).

Measured 2026-12-07 on the 2-core dev CPU (load average 1.2-2.0; passes of 1.3-1.8 s, so
figures swing by about 10%: two runs of a row differ that much): the demo model
(`configs/demo.py`, 1600 steps, llm.max_positions 512, so the benchmark budget fits to
about 470 new tokens; answers are one word and </s>), the 200 held-out questions,
questions/s; predictions identical for both budgets and both paths (200/200; the two
paths' --out files equal):

  batch   path                                          1024 fit   8 new tokens
  8       engine with decode spans (eval.predict now)    137.8      135.1
  8       engine, every step over the whole slot         121.1      145.6
  8       generate, left-padded (before the engine)      152.5      144.5
  1       engine with decode spans                       142.2      148.3
  1       engine, every step over the whole slot          96.6      147.6
  1       generate                                       110.0      113.3

With decode spans (`llamavid_jax/engine.py`) a step attends over what its rows use, so
the fitted 1024-token budget costs what 8 tokens cost (0.98x at batch 8, 1.04x at batch
1); before them a slot's whole prompt + budget was read each step. The engine prefills
each question alone where generate prefills a batch of 8 in one dispatch, which is most
of what is left between them at batch 8 (0.90x).
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

_CKPT = flags.DEFINE_string("ckpt", None, "inference directory or train WORKDIR", required=True)
_DATA = flags.DEFINE_string("data", "workdir/demo/data", "synthetic data folder (heldout_qa.json, videos/)")
_BATCH = flags.DEFINE_list("batch_sizes", ["8", "1"], "batch sizes to time")
_LIMIT = flags.DEFINE_integer("limit", 200, "questions per timed pass")
_TOKENS = flags.DEFINE_integer("max_new_tokens", 8, "the short budget, timed beside the benchmark's default")
_OUT = flags.DEFINE_string("out", None, "write {batch: {budget: predictions}} here")


def load() -> str:
  return "load average %.2f %.2f %.2f" % os.getloadavg()


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
  default = mod.GENERATION["max_new_tokens"]
  budgets = {f"{default} fit": dict(max_new_tokens=default, fit_max_new_tokens=True),
             str(_TOKENS.value): dict(max_new_tokens=_TOKENS.value)}
  print(f"{len(items)} questions, greedy, budgets: {', '.join(budgets)}; {Predictor.__module__} "
        f"{'engine' if hasattr(Predictor, 'answers') else 'generate'} path", flush=True)
  out = {}
  for b in map(int, _BATCH.value):
    rate, preds = {}, {}
    for name, kw in budgets.items():
      p = Predictor(m, batch_size=b, **kw)
      p.predict(items)   # compile every shape the questions need, for this budget
      t = time.perf_counter()
      preds[name] = p.predict(items)
      dt = time.perf_counter() - t
      getattr(p, "close", lambda: None)()
      rate[name] = len(items) / dt
      acc = sum((x or "").strip().lower() == it.meta["answer"].lower() for x, it in zip(preds[name], items)) / len(items)
      print(f"batch {b}, {name} new tokens: {rate[name]:.2f} questions/s ({dt:.1f}s, exact {acc:.3f}, "
            f"answered {sum(x is not None for x in preds[name])}/{len(items)}) [{load()}]", flush=True)
    a, z = budgets
    same = sum(x == y for x, y in zip(preds[a], preds[z]))
    print(f"batch {b}: {z} / {a} new tokens {rate[z] / rate[a]:.2f}x the questions/s, predictions identical "
          f"{same}/{len(items)}", flush=True)
    out[b] = preds
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
