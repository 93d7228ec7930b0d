"""Needle in a video haystack (synthetic clips): accuracy by clip length and needle depth.

  python -m eval.run needle --ckpt DIR --out PRED.jsonl [--lengths 64,128,...,4096] [--depths 0,25,50,75,100]
      [--per-cell 2] [--clip-dir DIR] [--size S] [--seed 0] [--prefill-chunk 1024] [--frame-chunk N]
      [--max-batch-frames 4096] [--rope-scaling auto|F] [--export needle.png]
  python -m eval.needle ...   (the standalone: needle.json, needle.png, seconds and peak RSS per length)

Items: for every cell (length L in frames, depth d in %) `--per-cell` clips drawn with the
synthetic generator (`llamavid_jax.data.synthetic.needle_clip`: an empty still scene at
1 fps with one coloured shape in its centre for 3 frames from frame int(d / 100 * (L - 3)),
its colour and shape drawn from (--seed, L, d, k)), written once to --clip-dir (default:
needle_clips/ beside the prediction file) and reused by later runs. Each asks "What color
is the shape that appears?" (prompt and Q-Former instruction); an answer is right when it
is the colour (lower case, final period dropped). --seed draws the needles (decoding is
greedy).

The predictor (`predictor(args)`, which `eval.run` takes instead of its default) runs the
checkpoint on every frame at 1 fps (the training frame cap is lifted), the Q-Former and
token generator over chunks of `--frame-chunk` frames (default: the checkpoint's
`frame_chunk`, or 256 where it has none; 0 = all at once), the LLM prefill over chunks of
`--prefill-chunk` positions, through the serving engine (`eval.predict`) with decode slots
for at most `--max-batch-frames` frames of clips at once (at least one clip; each clip is
prefilled alone), one clip length a call.

Positions: a clip of L frames puts S' = prompt + L * tokens_per_frame - 1 positions before
the answer, far more than a model trained on short clips has seen. `--rope-scaling auto`
divides the LLM's positions by ceil(S' / llm.max_positions) (the checkpoint's trained
length), per length and never below the checkpoint's own factor: the release's long-video
rule (factor ceil(max_len / 4096)) applied at inference (position interpolation); a number
sets one factor for every length; by default the checkpoint's factor is kept, so longer
clips extrapolate.

Record: {id, length, depth, index, frame, shape, color, video, answer, correct, model_id}.
Score: {overall, chance, lengths, depths, accuracy [lengths x depths] (None: no answered
clip), cells: [{length, depth, count, correct, failed, accuracy}]}. --export FILE.png: the
heat map.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np

from eval.benchmarks.common import Item
from llamavid_jax.data import synthetic

log = logging.getLogger("eval.benchmarks")

KIND = "generate"
ID_FIELD = "id"
GENERATION = dict(temperature=0.0, max_new_tokens=8)
FILES: dict = {}   # the clips are generated (`load`)

LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)
DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
CHANCE = 1 / len(synthetic.COLORS)
DEFAULT_FRAME_CHUNK = 256   # where the checkpoint has frame_chunk = 0


# --- arguments ----------------------------------------------------------------------
def add_arguments(parser) -> None:
  """The needle's own flags (`eval.run` and `eval.needle` add --ckpt, --out, --seed,
  --batch-size, --max-new-tokens and --dtype)."""
  parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                      help="clip lengths in frames (1 fps), comma separated")
  parser.add_argument("--depths", default=",".join(f"{d:g}" for d in DEPTHS),
                      help="needle depths in %% of the clip, comma separated")
  parser.add_argument("--per-cell", type=int, default=2, help="clips per (length, depth) cell")
  parser.add_argument("--clip-dir", help="the clip cache (default: needle_clips/ beside --out)")
  parser.add_argument("--size", type=int, default=0, help="frame size of the clips (default: the model's image size)")
  parser.add_argument("--prefill-chunk", type=int, default=1024, help="LLM prefill positions per step (0: all at once)")
  parser.add_argument("--frame-chunk", type=int, default=None,
                      help=f"frames per Q-Former step (default: the checkpoint's, or {DEFAULT_FRAME_CHUNK}; 0: all)")
  parser.add_argument("--max-batch-frames", type=int, default=4096, help="frames of the clips decoding at once (at least one clip)")
  parser.add_argument("--rope-scaling", default="", help="linear RoPE factor: a number, or auto (per length: "
                      "ceil(positions / the checkpoint's llm.max_positions)); default: the checkpoint's")


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
  return [float(x) for x in s.split(",") if x.strip()]


def _list_flag(errs: list, flag: str, text, parse, expected: str, what: str, ok, why: str) -> list:
  """A comma-separated flag parsed, with what is wrong with it appended to `errs`."""
  if not isinstance(text, str):   # parsed already
    return list(text)
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


def check(args, mode: str) -> list[str]:
  """What is wrong with the needle's flags (no model is loaded); parses --lengths and
  --depths into lists and --rope-scaling into "", "auto" or a float, in place."""
  errs: list[str] = []
  args.lengths = _list_flag(errs, "--lengths", args.lengths, _ints, "comma-separated integers", "length",
                            lambda n: n >= synthetic.NEEDLE_FRAMES,
                            f"a clip needs >= {synthetic.NEEDLE_FRAMES} frames (the needle's)")
  args.depths = _list_flag(errs, "--depths", args.depths, _floats, "comma-separated numbers (percent)", "depth",
                           lambda d: 0 <= d <= 100, "depths are percentages in [0, 100]")
  for flag, v, low in (("--per-cell", args.per_cell, 1), ("--prefill-chunk", args.prefill_chunk, 0),
                       ("--max-batch-frames", args.max_batch_frames, 1), ("--size", args.size, 0)):
    if v < low:
      errs.append(f"{flag} {v}: must be >= {low}")
  if args.rope_scaling not in ("", "auto") and not isinstance(args.rope_scaling, float):
    try:
      factor = float(args.rope_scaling)
    except ValueError:
      factor = 0.0
    if factor < 1:
      errs.append(f"--rope-scaling {args.rope_scaling}: expected auto or a number >= 1")
    args.rope_scaling = factor
  if args.frame_chunk is not None and (args.frame_chunk < 0 or args.frame_chunk & (args.frame_chunk - 1)):
    errs.append(f"--frame-chunk {args.frame_chunk}: must be 0 or a power of two (it divides the frame buckets)")
  if args.size % 2:
    errs.append(f"--size {args.size}: H.264 needs an even frame size")
  if args.clip_dir is not None and os.path.isfile(args.clip_dir):
    errs.append(f"--clip-dir {args.clip_dir}: is a file (want a folder)")
  return errs


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
  log.info("needle clips: %d written, %d reused in %s", made, len(specs) - made, folder)
  return paths


def items(specs: Sequence[dict], paths: Sequence[str]) -> list[Item]:
  q = synthetic.NEEDLE_QUESTION
  return [Item(id=s["id"], prompt=q, instruction=q, media=p, kind="video", meta=dict(s)) for s, p in zip(specs, paths)]


def load(args) -> list[Item]:
  """The clips of every cell (written to --clip-dir unless there) as Items; the frame
  size is --size or the checkpoint's image size (its config only is read)."""
  size = args.size
  if not size:
    from llamavid_jax.checkpoint import orbax_io
    size = orbax_io.load_model_config(args.ckpt).vision.image_size
  folder = args.clip_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "needle_clips")
  specs = clip_specs(args.lengths, args.depths, args.per_cell, args.seed)
  return items(specs, write_clips(specs, folder, size))


# --- records and scores -------------------------------------------------------------
def is_right(answer: str | None, color: str) -> bool:
  return answer is not None and answer.strip().lower().rstrip(".").strip() == color


def record(item: Item, pred: str, model_id: str = "llamavid-jax") -> dict:
  m = item.meta
  return dict(id=item.id, **{k: m[k] for k in ("length", "depth", "index", "frame", "shape", "color")},
              video=item.media, answer=pred, correct=is_right(pred, m["color"]), model_id=model_id)


def tabulate(specs: Sequence[dict], answers: Sequence[str | None], lengths: Sequence[int],
             depths: Sequence[float]) -> dict:
  """-> {cells: [{length, depth, count, correct, failed, accuracy}], accuracy:
  float[lengths][depths] (None where a cell has no answered clip), clips: [...spec,
  answer, correct], overall}. `count` counts the clips answered (None: media unreadable,
  counted in `failed`)."""
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


def score(records: list[dict], args) -> dict:
  """The records' accuracy by (length, depth): the lengths and depths they hold."""
  lengths = sorted({r["length"] for r in records})
  depths = sorted({float(r["depth"]) for r in records})
  specs = [dict(r, depth=float(r["depth"])) for r in records]
  t = tabulate(specs, [r.get("answer") for r in records], lengths, depths)
  return dict(overall=t["overall"], chance=CHANCE, lengths=lengths, depths=depths, accuracy=t["accuracy"],
              cells=t["cells"])


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
  """A PNG of accuracy as colour (red 0 .. green 1; grey: no answer), a row per length,
  a column per depth, every cell annotated with its accuracy and count."""
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


def export(records: list[dict], path: str, args) -> int:
  """--export: the heat map of the records' scores as a PNG at `path` -> the number of cells."""
  s = score(records, args)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  heatmap(s, s["lengths"], s["depths"], path, f"needle in a video haystack: {getattr(args, 'model_id', '')}")
  return len(s["cells"])


# --- the model side -----------------------------------------------------------------
class ModelPredict:
  """The checkpoint as a predictor (module docstring): every frame at 1 fps (no
  training cap), frame-chunked encoding, chunked prefill, greedy decoding; the LLM's
  linear RoPE factor set per clip length by `--rope-scaling`."""

  def __init__(self, args):
    from llamavid_jax import inference
    from llamavid_jax.data.conversation import tokenize_with_image
    self.args = args
    from eval import args as eval_args
    m = eval_args.load(args)
    chunk = args.frame_chunk if args.frame_chunk is not None else (m.cfg.frame_chunk or DEFAULT_FRAME_CHUNK)
    # the needle is 3 frames: a uniform frame cap would skip it; clips may run past the
    # trained positions (without --rope-scaling auto that is what the table measures)
    self.m = m.replace(cfg=dataclasses.replace(m.cfg, frame_chunk=chunk), sample_cap=None, extrapolate=True)
    self.cfg = self.m.cfg
    self._by_rope = {self.cfg.llm.rope_scaling: self.m}
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

  def model(self, length: int):
    """The Model for clips of `length` frames (its RoPE factor), built once per factor."""
    f = self.rope_scaling(length)
    if f not in self._by_rope:
      self._by_rope[f] = self.m.replace(cfg=dataclasses.replace(self.cfg, llm=dataclasses.replace(
          self.cfg.llm, rope_scaling=f)))
    return self._by_rope[f]

  def __call__(self, its: list[Item]) -> list[str | None]:
    """Clips of one length -> answers."""
    from eval.predict import Predictor
    length = max(it.meta["length"] for it in its)
    cap = max(1, min(self.args.batch_size, self.args.max_batch_frames // length))
    bs = min(cap, len(its))   # the engine's decode slots (prefill is one clip at a time)
    with Predictor(self.model(length), batch_size=bs, max_new_tokens=self.args.max_new_tokens, temperature=0.0,
                   prefill_chunk=self.args.prefill_chunk) as p:
      return p.predict(its)

  def predict(self, its: list[Item]) -> list[str | None]:
    """Clips of any lengths -> answers in their order, one length a call."""
    out: list[str | None] = [None] * len(its)
    for length in sorted({it.meta["length"] for it in its}):
      idx = [i for i, it in enumerate(its) if it.meta["length"] == length]
      for i, a in zip(idx, self([its[i] for i in idx])):
        out[i] = a
    return out


def predictor(args) -> ModelPredict:
  """`eval.run`'s predictor for this benchmark (instead of its default)."""
  return ModelPredict(args)
