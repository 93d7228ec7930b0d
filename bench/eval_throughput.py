"""Questions per second of the video-QA benchmark path (eval.run msvd_qa's predictor),
with the benchmark's own token budget and with a short one.

  PYTHONPATH=. python bench/eval_throughput.py --ckpt workdir/demo/context/inference \
      --data workdir/demo/data [--batch_sizes 1,8] [--limit 64] [--max_new_tokens 8]

Reads DATA/heldout_qa.json (the synthetic generator's MSVD-QA-format held-out file)
through `eval.benchmarks.video_qa`, and for each batch size answers the first `limit`
questions (greedy) with the benchmark's default budget (`GENERATION["max_new_tokens"]`:
the release's 1024, cut to what the model's positions leave, as the runner cuts it) and
with `max_new_tokens`, each by two paths: `eval.predict.Predictor`
(the runner's: the serving engine with `batch` slots) and `generate_answers` (the
runner's path before it: `batch` items a left-padded `Model.generate` call); each once
untimed (to compile every bucket the questions fall in: timing a pass that compiles
would charge the budget timed first for both), then timed. Prints questions/s of each,
their ratio and whether the predictions are identical. The time includes decoding the videos on
the host, as a benchmark run does. Decoding stops when every row of a batch has emitted
</s> (`llamavid_jax.generate`), so the long budget costs only the tokens produced.

Measured on the 2-core dev CPU shared with other jobs (figures swing 2x with the load):
a `configs/demo.py` model trained 400 steps (held-out exact 0.755; answers are one word
and </s>), the first 40 held-out questions, questions/s:

  batch   1024 new tokens   8 new tokens   time 1024 / 8   predictions identical
  1       103.0             69.1           0.67x           40/40
  8       107.0             106.4          0.99x           40/40
  before the early stop (batch 8, the same model): 0.21 with 1024, 69.2 with 8 (330x)

Engine against generate (the same kind of model, 512 positions, so the benchmark's
1024 is cut to ~468; load average 12-17 on the 2 cores, so only the ratios within a
line mean much), questions/s, engine / generate, two runs:

  batch 1, 1024 new tokens   21.8 / 14.8 (1.47x)    8.0 / 32.1 (0.25x)
  batch 1, 8 new tokens      15.7 / 83.5 (0.19x)   17.0 / 33.6 (0.51x)
  batch 8, 1024 new tokens   15.0 / 95.3 (0.16x)    4.6 / 64.6 (0.07x)
  batch 8, 8 new tokens      27.4 / 103.6 (0.26x)  37.5 / 23.0 (1.63x)
  predictions identical: 40/40 in every line.

The engine loses most with a long budget and a full batch: each slot holds the prompt
and the whole budget from the start, rounded up to a power of two (~72 + 468 -> 1024
positions here), and every decode step runs over all of it, where generate's cache
starts at prompt + 8 and stops growing at </s>. Timed inside the engine (batch 8, 40
questions): a decode dispatch (8 steps) took 63 ms with 128-position slots (budget 8)
and 1.5 s with 1024-position slots (budget 1024), 24x for 8x the positions; the 40
one-request prefills took 0.13 s and 0.53 s.
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
_TOKENS = flags.DEFINE_integer("max_new_tokens", 8, "the short budget, timed beside the benchmark's default")


def generate_answers(m, items, batch_size: int, max_new_tokens: int) -> list[str]:
  """The runner's path before the engine: `batch_size` items a left-padded
  `Model.generate` call (greedy), which stops once every row of the batch has ended."""
  from eval.predict import Predictor
  reqs = Predictor(m).requests(items)
  out = []
  for i in range(0, len(reqs), batch_size):
    batch = reqs[i:i + batch_size]
    n = min([max_new_tokens] + [m.room(r) for r in batch])   # as the runner cuts the benchmark's budget
    out += [a.text for a in m.generate(batch, max_new_tokens=n)]
  return out


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
  budgets = (mod.GENERATION["max_new_tokens"], _TOKENS.value)
  print(f"{len(items)} questions, greedy, budgets {budgets[0]} (the benchmark's) and {budgets[1]}", flush=True)
  for b in map(int, _BATCH.value):
    rate, preds = {}, {}
    for n in budgets:
      for path in ("engine", "generate"):
        if path == "engine":
          p = Predictor(m, batch_size=b, max_new_tokens=n, fit_max_new_tokens=True)
          answer = p.predict
        else:
          p, answer = None, lambda its: generate_answers(m, its, b, n)
        answer(items)   # compile every (text, frame) bucket the questions fall in, for this budget
        t = time.perf_counter()
        preds[path, n] = answer(items)
        dt = time.perf_counter() - t
        if p is not None:
          p.close()
        rate[path, n] = len(items) / dt
        acc = sum(x.strip().lower() == it.meta["answer"].lower() for x, it in zip(preds[path, n], items)) / len(items)
        print(f"batch {b}, {n} new tokens, {path}: {rate[path, n]:.2f} questions/s ({dt:.1f}s, exact {acc:.3f})",
              flush=True)
      same = sum(x == y for x, y in zip(preds["engine", n], preds["generate", n]))
      print(f"batch {b}, {n} new tokens: engine / generate {rate['engine', n] / rate['generate', n]:.2f}x, "
            f"predictions identical {same}/{len(items)}", flush=True)
    same = sum(x == y for x, y in zip(preds["engine", budgets[0]], preds["engine", budgets[1]]))
    print(f"batch {b}, engine: time with {budgets[0]} / with {budgets[1]} new tokens "
          f"{rate['engine', budgets[1]] / rate['engine', budgets[0]]:.2f}x, predictions identical {same}/{len(items)}",
          flush=True)


if __name__ == "__main__":
  app.run(main)
