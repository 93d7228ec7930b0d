"""Needle in a video haystack, standalone: accuracy by clip length and needle depth.

  python -m eval.needle --ckpt DIR [--lengths 64,128,256,512,1024,2048,4096]
      [--depths 0,25,50,75,100] [--per-cell 2] [--out DIR] [--seed 0] [--prefill-chunk 1024]
      [--rope-scaling auto|F] [--frame-chunk N] [--batch-size 8] [--max-batch-frames 4096] [--size S]

The benchmark itself (clips, question, predictor, scoring, the heat map) is
`eval.benchmarks.needle`, which `python -m eval.run needle` runs like any other benchmark
(a prediction file, resumable, chunked). This command runs it in one go and writes what
`make needle` shows: the clips in OUT/clips/ (reused by later runs), lengths shortest
first, each printing its seconds and the process's peak RSS so far (memory stays bounded
on long clips: frame-chunked Q-Former, chunked prefill, at most `--max-batch-frames`
frames a batch).

Out: OUT/needle.json ({cells: [{length, depth, count, correct, failed, accuracy}],
accuracy [lengths x depths], clips: [{id, length, depth, frame, color, shape, answer,
correct}], runs: [{length, clips, seconds, peak_rss_mb, positions, rope_scaling}], ...}),
OUT/needle.png (a heat map of accuracy, lengths x depths, annotated cells) and the table
on stdout (rows: lengths, columns: depths). Flags are checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from typing import Callable, Sequence

from eval import args as eval_args
from eval.benchmarks import needle as bench
from eval.benchmarks.common import Item
from eval.benchmarks.needle import (CHANCE, DEPTHS, LENGTHS, ModelPredict, clip_specs, heatmap, is_right,  # noqa: F401
                                    items, table, write_clips)
from llamavid_jax import cli
from llamavid_jax import inference

log = logging.getLogger("eval.needle")


# --- the run ------------------------------------------------------------------------
def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


def ask(its: Sequence[Item], predict: Callable[[list[Item]], list[str | None]]) -> tuple[list, list[dict]]:
  """Asks the items length by length, shortest first -> (answers in item order, one
  {length, clips, seconds, peak_rss_mb, **predict.settings(length)} per length)."""
  answers: list[str | None] = [None] * len(its)
  runs = []
  for length in sorted({it.meta["length"] for it in its}):
    idx = [i for i, it in enumerate(its) if it.meta["length"] == length]
    t = time.perf_counter()
    got = predict([its[i] for i in idx])
    for i, a in zip(idx, got):
      answers[i] = a
    settings = predict.settings(length) if hasattr(predict, "settings") else {}
    runs.append(dict(length=length, clips=len(idx), seconds=time.perf_counter() - t, peak_rss_mb=peak_rss_mb(),
                     **settings))
    r = runs[-1]
    right = sum(is_right(answers[i], its[i].meta["color"]) for i in idx)
    print(f"[needle] {length} frames: {right}/{len(idx)} right, {r['seconds']:.1f}s, "
          f"peak RSS {r['peak_rss_mb']:.0f} MB" + "".join(f", {k} {v:g}" for k, v in settings.items()), flush=True)
  return answers, runs


def run(args: argparse.Namespace, predict: Callable[[list[Item]], list[str | None]], size: int,
        info: dict | None = None) -> dict:
  """Clips for every cell (cached in --clip-dir, default OUT/clips), answers from `predict` (Items -> answers,
  one length at a time), the table printed, OUT/needle.json and OUT/needle.png written.
  -> the needle.json contents."""
  t0 = time.perf_counter()
  specs = clip_specs(args.lengths, args.depths, args.per_cell, args.seed)
  paths = write_clips(specs, getattr(args, "clip_dir", None) or os.path.join(args.out, "clips"), size)
  answers, runs = ask(items(specs, paths), predict)
  result = bench.tabulate(specs, answers, args.lengths, args.depths)
  for c, p in zip(result["clips"], paths):
    c["video"] = p
  out = dict(ckpt=args.ckpt, seed=args.seed, lengths=list(args.lengths), depths=list(args.depths),
             per_cell=args.per_cell, size=size, chance=CHANCE, **(info or {}), overall=result["overall"],
             accuracy=result["accuracy"], cells=result["cells"], runs=runs, clips=result["clips"],
             seconds=time.perf_counter() - t0)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "needle.json"), "w") as f:
    json.dump(out, f, indent=1)
  parts = os.path.normpath(args.ckpt or "model").split(os.sep)
  name = "/".join(parts[-2:]) if parts[-1] == "inference" else parts[-1]   # WORKDIR/inference
  rope = (info or {}).get("rope_scaling")
  heatmap(result, args.lengths, args.depths, os.path.join(args.out, "needle.png"),
          f"needle in a video haystack: {name}\n{args.per_cell} clips / cell"
          + (f", RoPE scaling {rope}" if rope not in (None, "") else ""))
  print(f"needle accuracy ({args.per_cell} clips per cell, chance {CHANCE:.2f}):")
  print(table(result, args.lengths, args.depths))
  print(f"[needle] wrote {os.path.join(args.out, 'needle.json')} and needle.png", flush=True)
  return out


# --- arguments ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m eval.needle", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  eval_args.add_model_flags(p)   # --ckpt --dtype --mesh --quant
  p.add_argument("--out", default="needle_out", help="folder for needle.json, needle.png and clips/ (the clip cache)")
  p.add_argument("--seed", type=int, default=0, help="draws the needles' colours and shapes")
  p.add_argument("--batch-size", type=int, default=8, help="clips decoding at once (the engine's slots; at most)")
  p.add_argument("--max-new-tokens", type=int, default=bench.GENERATION["max_new_tokens"])
  bench.add_arguments(p)
  return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Parses and checks every flag (no model is loaded); a bad one exits with status 2
  and a message naming it."""
  p = build_parser()
  a = p.parse_args(argv)
  errs = bench.check(a, "run")
  for flag, v, low in (("--batch-size", a.batch_size, 1), ("--max-new-tokens", a.max_new_tokens, 1)):
    if v < low:
      errs.append(f"{flag} {v}: must be >= {low}")
  try:
    inference.check_ckpt(a.ckpt)
  except inference.CheckpointError as e:
    errs.append(str(e))
  if os.path.isfile(a.out):
    errs.append(f"--out {a.out}: is a file (want a folder)")
  if errs:
    p.error("; ".join(errs))
  eval_args.check_model_flags(p, a)
  return a


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING)
  predict = ModelPredict(args)
  return run(args, predict, predict.size, predict.info)


if __name__ == "__main__":
  cli.run(main)   # a known error: `error: <one line>`, exit 2 / 1 (--debug: the traceback)
