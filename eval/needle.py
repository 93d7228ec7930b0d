"""Needle in a video haystack: accuracy by clip length and needle depth.

  python -m eval.needle --ckpt DIR [--lengths 64,128,256,512,1024,2048,4096]
      [--depths 0,25,50,75,100] [--per-cell 2] [--out DIR] [--seed 0] [--prefill-chunk 1024]
      [--rope-scaling auto|F] [--frame-chunk N] [--batch-size 8] [--max-batch-frames 4096] [--size S]

For every cell (length L in frames, depth d in %) `--per-cell` clips are drawn with the
synthetic generator (`llamavid_jax.data.synthetic.needle_clip`: an empty still scene at
1 fps with one coloured shape in its centre for 3 frames from frame int(d / 100 * (L - 3)),
its colour and shape drawn from (seed, L, d, k)), written once to OUT/clips/ and reused
by later runs. Each is asked "What color is the shape that appears?" through the
inference core (`eval.predict`: the release's prompt, the question as the Q-Former
instruction, greedy decoding, the LLM prefilled `--prefill-chunk` positions at a time);
an answer is right when it is the colour (lower case, final period dropped). Every
frame is used: the checkpoint's training frame cap (`max_frames`) is lifted.

Positions: a clip of L frames puts S' = prompt + L * tokens_per_frame - 1 positions
before the answer, far more than a model trained on short clips has seen.
`--rope-scaling auto` divides the LLM's positions by ceil(S' / llm.max_positions) (the
checkpoint's trained length), per length and never below the checkpoint's own factor:
the release's long-video rule (factor ceil(max_len / 4096)) applied at inference
(position interpolation); a number sets one factor for every length; by default the
checkpoint's factor is kept, so longer clips extrapolate.

Memory stays bounded on long clips: the Q-Former and token generator run over chunks of
`--frame-chunk` frames (default: the checkpoint's `frame_chunk`, or 256 where it has
none; 0 = all at once), the LLM prefill over chunks of `--prefill-chunk` positions, and a
batch holds at most `--max-batch-frames` frames (at least one clip). Lengths run
shortest first; each prints its seconds and the process's peak RSS so far.

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

import numpy as np

from eval.benchmarks.common import Item
from llamavid_jax.data import synthetic

log = logging.getLogger("eval.needle")

LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)
DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
CHANCE = 1 / len(synthetic.COLORS)
DEFAULT_FRAME_CHUNK = 256   # where the checkpoint has frame_chunk = 0


# --- clips --------------------------------------------------------------------------
def clip_specs(lengths: Sequence[int], depths: Sequence[float], per_cell: int, seed: int) -> list[dict]:
  """One dict per clip, cell by cell (lengths outer, depths inner): id, length, depth
  (%), index, frame (the needle's first), shape, color. A clip's shape and colour depend
  only on (seed, length, depth, index): a cell's clips do not change when others are added."""
  specs = []
  for length in lengths:
    for depth in depths:
      for k in range(per_cell):
        rng = np.random.default_rng([seed, length, int(round(depth * 1000)), k])
        shape, color = str(rng.choice(synthetic.SHAPES)), str(rng.choice(list(synthetic.COLORS)))
        specs.append(dict(id=f"needle_L{length}_d{depth:g}_{k}_seed{seed}", length=length, depth=depth, index=k,
                          frame=synthetic.needle_frame(depth / 100, length), shape=shape, color=color))
  return specs


def write_clips(specs: Sequence[dict], folder: str, size: int) -> list[str]:
  """The clips' mp4s in `folder` (named by id and frame size), written unless already
  there -> their paths. Each is written to a temporary name first, so a killed run
  leaves no partial clip to reuse."""
  os.makedirs(folder, exist_ok=True)
  paths, made = [], 0
  for s in specs:
    path = os.path.join(folder, f"{s['id']}_s{size}.mp4")
    if not os.path.isfile(path):
      part = path[:-len(".mp4")] + ".part.mp4"
      synthetic.write_needle(part, size, s["length"], s["depth"] / 100, s["shape"], s["color"])
      os.replace(part, path)
      made += 1
    paths.append(path)
  log.info("clips: %d written, %d reused in %s", made, len(specs) - made, folder)
  return paths


def items(specs: Sequence[dict], paths: Sequence[str]) -> list[Item]:
  q = synthetic.NEEDLE_QUESTION
  return [Item(id=s["id"], prompt=q, instruction=q, media=p, kind="video", meta=dict(s)) for s, p in zip(specs, paths)]


# --- scoring ------------------------------------------------------------------------
def is_right(answer: str | None, color: str) -> bool:
  return answer is not None and answer.strip().lower().rstrip(".").strip() == color


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


def score(specs: Sequence[dict], answers: Sequence[str | None], lengths: Sequence[int],
          depths: Sequence[float]) -> dict:
  """-> {cells: [{length, depth, count, correct, accuracy}], accuracy: float[lengths][depths]
  (None where a cell has no answered clip), clips: [...spec, answer, correct], overall}.
  `count` counts the clips answered (None: media unreadable, counted in `failed`)."""
  clips = [dict(s, answer=a, correct=is_right(a, s["color"])) for s, a in zip(specs, answers)]
  cells, acc = [], np.full((len(lengths), len(depths)), np.nan)
  for i, length in enumerate(lengths):
    for j, depth in enumerate(depths):
      mine = [c for c in clips if c["length"] == length and c["depth"] == depth]
      done = [c for c in mine if c["answer"] is not None]
      right = sum(c["correct"] for c in done)
      if done:
        acc[i, j] = right / len(done)
      cells.append(dict(length=length, depth=depth, count=len(done), correct=right, failed=len(mine) - len(done),
                        accuracy=acc[i, j] if done else None))
  answered = [c for c in clips if c["answer"] is not None]
  overall = sum(c["correct"] for c in answered) / len(answered) if answered else None
  return dict(cells=cells, accuracy=[[None if np.isnan(x) else float(x) for x in row] for row in acc],
              clips=clips, overall=overall)


def table(result: dict, lengths: Sequence[int], depths: Sequence[float]) -> str:
  """The accuracy table: a row per length, a column per depth, row / column means."""
  acc = np.array([[np.nan if x is None else x for x in row] for row in result["accuracy"]], float)
  fmt = lambda x: "   -" if np.isnan(x) else f"{x:4.2f}"
  mean = lambda a: np.nan if np.all(np.isnan(a)) else float(np.nanmean(a))
  head = "frames \\ depth %" + "".join(f"{d:>7g}" for d in depths) + "   mean"
  lines = [head]
  for i, length in enumerate(lengths):
    lines.append(f"{length:>16d}" + "".join(f"   {fmt(x)}" for x in acc[i]) + f"   {fmt(mean(acc[i]))}")
  lines.append(f"{'mean':>16s}" + "".join(f"   {fmt(mean(acc[:, j]))}" for j in range(len(depths)))
               + f"   {fmt(np.nan if result['overall'] is None else result['overall'])}")
  return "\n".join(lines)


def heatmap(result: dict, lengths: Sequence[int], depths: Sequence[float], path: str, title: str = "") -> None:
  """needle.png: accuracy as colour (red 0 .. green 1; grey: no answer), a row per
  length, a column per depth, every cell annotated with its accuracy and count."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  acc = np.array([[np.nan if x is None else x for x in row] for row in result["accuracy"]], float)
  counts = {(c["length"], c["depth"]): c for c in result["cells"]}
  fig, ax = plt.subplots(figsize=(1.3 + 1.1 * len(depths), 1.2 + 0.55 * len(lengths)), dpi=120)
  cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#bbbbbb")
  im = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0, vmax=1, aspect="auto")
  for i, length in enumerate(lengths):
    for j, depth in enumerate(depths):
      c = counts[(length, depth)]
      text = "n/a" if np.isnan(acc[i, j]) else f"{acc[i, j]:.2f}\n{c['correct']}/{c['count']}"
      dark = not np.isnan(acc[i, j]) and not 0.2 <= acc[i, j] <= 0.8   # the colormap's dark ends
      ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
  ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
  ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_xlabel("needle depth (% of the clip)")
  ax.set_ylabel("clip length (frames at 1 fps)")
  ax.set_title(title or "needle in a video haystack", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03).set_label(f"accuracy (chance {CHANCE:.2f})")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def run(args: argparse.Namespace, predict: Callable[[list[Item]], list[str | None]], size: int,
        info: dict | None = None) -> dict:
  """Clips for every cell (cached in OUT/clips), answers from `predict` (Items -> answers,
  one length at a time), the table printed, OUT/needle.json and OUT/needle.png written.
  -> the needle.json contents."""
  t0 = time.perf_counter()
  specs = clip_specs(args.lengths, args.depths, args.per_cell, args.seed)
  paths = write_clips(specs, os.path.join(args.out, "clips"), size)
  answers, runs = ask(items(specs, paths), predict)
  result = score(specs, answers, args.lengths, args.depths)
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


# --- the model side -----------------------------------------------------------------
class ModelPredict:
  """The checkpoint as `run`'s predict: every frame at 1 fps (no training cap),
  frame-chunked encoding, chunked prefill, greedy decoding; `--rope-scaling` sets the
  LLM's linear RoPE factor (`auto`: per length, ceil(S' / llm.max_positions) with S' the
  spliced prompt length, never below the checkpoint's: the release's long-video rule)."""

  def __init__(self, args: argparse.Namespace):
    import dataclasses
    from llamavid_jax import inference
    from llamavid_jax.data.conversation import tokenize_with_image
    self.args = args
    self.m = m = inference.load(args.ckpt, dtype=args.dtype)
    m.sample_cap = None   # the needle is 3 frames: a uniform cap would skip it
    chunk = args.frame_chunk if args.frame_chunk is not None else (m.cfg.frame_chunk or DEFAULT_FRAME_CHUNK)
    self.cfg = dataclasses.replace(m.cfg, frame_chunk=chunk)
    self.size = args.size or m.cfg.vision.image_size
    # the prompt's ids with one -200, which the frames' tokens replace
    self.text_len = len(tokenize_with_image(inference.inference_prompt(synthetic.NEEDLE_QUESTION), m.tokenizer))
    self.info = dict(frame_chunk=chunk, prefill_chunk=args.prefill_chunk, dtype=args.dtype,
                     tokens_per_frame=m.cfg.tokens_per_frame, rope_scaling=args.rope_scaling or m.cfg.llm.rope_scaling,
                     max_positions=m.cfg.llm.max_positions, rope_theta=m.cfg.llm.rope_theta)

  def positions(self, length: int) -> int:
    """S': the LLM positions of a `length`-frame prompt."""
    return self.text_len - 1 + length * self.cfg.tokens_per_frame

  def rope_scaling(self, length: int) -> float:
    a, ckpt = self.args.rope_scaling, self.cfg.llm.rope_scaling
    if a == "auto":
      return float(max(ckpt, -(-self.positions(length) // self.cfg.llm.max_positions)))
    return float(a) if a else ckpt

  def settings(self, length: int) -> dict:
    return dict(positions=self.positions(length), rope_scaling=self.rope_scaling(length))

  def __call__(self, its: list[Item]) -> list[str | None]:
    import dataclasses
    from eval.predict import Predictor
    from llamavid_jax.models import LlamaVid
    length = max(it.meta["length"] for it in its)
    cfg = dataclasses.replace(self.cfg, llm=dataclasses.replace(self.cfg.llm, rope_scaling=self.rope_scaling(length)))
    if cfg != self.m.cfg:
      self.m.cfg, self.m.model = cfg, LlamaVid(cfg)
    cap = max(1, min(self.args.batch_size, self.args.max_batch_frames // length))
    bs = -(-len(its) // -(-len(its) // cap))   # equal batches: a smaller last one would compile again
    p = Predictor(self.m, batch_size=bs, max_new_tokens=self.args.max_new_tokens, temperature=0.0,
                  prefill_chunk=self.args.prefill_chunk)
    return p.predict(its)


# --- arguments ----------------------------------------------------------------------
def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
  return [float(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.needle", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True, help="converted / inference directory or train WORKDIR")
  p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="clip lengths in frames (1 fps), comma separated")
  p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEPTHS), help="needle depths in %% of the clip, comma separated")
  p.add_argument("--per-cell", type=int, default=2, help="clips per (length, depth) cell")
  p.add_argument("--out", default="needle_out", help="folder for needle.json, needle.png and clips/ (the clip cache)")
  p.add_argument("--seed", type=int, default=0, help="draws the needles' colours and shapes")
  p.add_argument("--prefill-chunk", type=int, default=1024, help="LLM prefill positions per step (0: all at once)")
  p.add_argument("--frame-chunk", type=int, default=None,
                 help=f"frames per Q-Former step (default: the checkpoint's, or {DEFAULT_FRAME_CHUNK}; 0: all)")
  p.add_argument("--batch-size", type=int, default=8, help="clips per generate call (at most)")
  p.add_argument("--max-batch-frames", type=int, default=4096, help="frames per generate call (at least one clip)")
  p.add_argument("--max-new-tokens", type=int, default=8)
  p.add_argument("--size", type=int, default=0, help="frame size of the clips (default: the model's image size)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--rope-scaling", default="", help="linear RoPE factor: a number, or auto (per length: "
                 "ceil(positions / the checkpoint's llm.max_positions)); default: the checkpoint's")
  return p


def _list_flag(errs: list, flag: str, text: str, parse, expected: str, what: str, ok, why: str) -> list:
  """A comma-separated flag parsed, with what is wrong with it appended to `errs`."""
  try:
    values = parse(text)
  except ValueError:
    errs.append(f"{flag} {text!r}: expected {expected}")
    return []
  if not values:
    errs.append(f"{flag}: no {what} given")
  bad = [v for v in values if not ok(v)]
  if bad:
    errs.append(f"{flag} {bad}: {why}")
  if len(set(values)) != len(values):
    errs.append(f"{flag} {values}: repeated {what}")
  return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Parses and checks every flag (no model is loaded); a bad one exits with status 2
  and a message naming it."""
  p = build_parser()
  a = p.parse_args(argv)
  errs = []
  a.lengths = _list_flag(errs, "--lengths", a.lengths, _ints, "comma-separated integers", "length",
                         lambda n: n >= synthetic.NEEDLE_FRAMES,
                         f"a clip needs >= {synthetic.NEEDLE_FRAMES} frames (the needle's)")
  a.depths = _list_flag(errs, "--depths", a.depths, _floats, "comma-separated numbers (percent)", "depth",
                        lambda d: 0 <= d <= 100, "depths are percentages in [0, 100]")
  for flag, v, low in (("--per-cell", a.per_cell, 1), ("--prefill-chunk", a.prefill_chunk, 0),
                       ("--batch-size", a.batch_size, 1), ("--max-batch-frames", a.max_batch_frames, 1),
                       ("--max-new-tokens", a.max_new_tokens, 1), ("--size", a.size, 0)):
    if v < low:
      errs.append(f"{flag} {v}: must be >= {low}")
  if a.rope_scaling not in ("", "auto"):
    try:
      factor = float(a.rope_scaling)
    except ValueError:
      factor = 0.0
    if factor < 1:
      errs.append(f"--rope-scaling {a.rope_scaling}: expected auto or a number >= 1")
    a.rope_scaling = factor
  if a.frame_chunk is not None and (a.frame_chunk < 0 or a.frame_chunk & (a.frame_chunk - 1)):
    errs.append(f"--frame-chunk {a.frame_chunk}: must be 0 or a power of two (it divides the frame buckets)")
  if a.size % 2:
    errs.append(f"--size {a.size}: H.264 needs an even frame size")
  if not os.path.exists(a.ckpt):
    errs.append(f"--ckpt {a.ckpt}: no such directory")
  if os.path.isfile(a.out):
    errs.append(f"--out {a.out}: is a file (want a folder)")
  if errs:
    p.error("; ".join(errs))
  return a


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING)
  predict = ModelPredict(args)
  return run(args, predict, predict.size, predict.info)


if __name__ == "__main__":
  main()
