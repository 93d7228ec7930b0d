"""Synthetic video QA, no downloads: clips of moving coloured shapes with questions
whose answers need the right object, written as real mp4 files + LLaVA-format JSON +
small tokenizers in transformers' format, so they run the same code path as real data.

  python -m llamavid_jax.data.synthetic --out DIR [--num-train 2000] [--num-eval 200]
      [--seed 0] [--size 64] [--frames 4] [--questions color,shape,count,motion] [--long 4]
      [--long-frames 300 | MIN-MAX] [--long-depths 0.05-0.95] [--train-turns 1] [--grid 0]
      [--image-every-turn] [--single-object 0] [--workers CPUS]

Short clips: 2-3 objects (distinct shapes and distinct colours) moving in straight
lines; written at 2 fps with 2*frames frames, so the release's 1-fps rule keeps
`frames` of them. Questions (single-word answers from a closed set):
  color   "What color is the {shape}?"                       -> red, green, ...
  shape   "What shape is the {color} object?"                -> circle, cross, triangle
  count   "How many objects are there?"                      -> two, three
  motion  "Which direction does the {color} object move?"    -> left, right, up, down
With `--grid G` every object has a cell of its own in a G x G grid and moves inside it
(0.3 of a cell over the kept frames): set G to the ViT's patch grid and each object is
seen whole by one patch, its motion as a shift inside that patch. A randomly
initialised, frozen ViT needs both: it tells shapes apart only when an object is whole
in one patch, and its tiny position embeddings barely say which patch that is, so an
object stepping from cell to cell looks the same in every frame (a pretrained ViT
needs neither).
With `--train-turns K` every training clip is one K-turn conversation, one question
of each of K different types (the release's multi-turn LLaVA layout; with `imgsp_v1`
each turn gets its own `<image>` and Q-Former instruction), chosen so that no question
names another's answer (else later turns could copy it from the text instead of
looking); held-out clips always have one question, so exact match is unambiguous.
`--image-every-turn` starts every question with `<image>`, as held-out questions do
(`imgsp_v1` would put the later turns' at the start or the end by a coin flip); such
samples need `imgsp_v1` (`vicuna_v1` takes one `<image>` per sample).
`--single-object F`: a fraction F of the training clips show one object, asked about
its motion and its colour or shape (no count); held-out clips always have 2-3.
Long clips (`--long N`): `--long-frames` frames at 1 fps (MIN-MAX: log-uniform per clip)
with one "needle": a shape that appears for 3 frames in the centre of an empty still
scene at a depth drawn from `--long-depths` (default 0.05-0.95); "What color is the shape
that appears?" (`needle_clip` draws one; `eval.needle` asks them by length and depth).

Out: DIR/{train,heldout,long}.json, DIR/heldout_qa.json and DIR/long_qa.json (the
held-out and long questions in MSVD-QA's layout), DIR/videos/*.mp4, DIR/manifest.json (ground truth),
DIR/tokenizers/{llm,qformer}. Same seed -> same JSON and the same decoded frames.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os

import av
import numpy as np

# Six colours far apart and three shapes unlike each other (a filled square and a
# disc of ~12 px differ in their corners only; orange sat next to red, white next to
# yellow): what the context attention must tell apart is what a frozen random ViT
# tells apart (train/demo.py has the measurements).
COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 70, 235), "yellow": (240, 230, 30),
          "purple": (160, 40, 200), "cyan": (30, 225, 230)}
SHAPES = ("circle", "cross", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
COUNTS = {2: "two", 3: "three"}
QUESTION_TYPES = ("color", "shape", "count", "motion")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
BACKGROUND = 40
# Grid clips, in cells: object radius, and the distance it moves over the kept frames
# (an object's pixels stay in its cell but for an edge row at the ends of its path).
GRID_RADIUS, GRID_SPAN = 0.42, 0.3


def draw(size: int, objects: list[dict], t: float) -> np.ndarray:
  """uint8[size, size, 3]: every object at its position at time t."""
  img = np.full((size, size, 3), BACKGROUND, np.uint8)
  yy, xx = np.mgrid[:size, :size]
  for o in objects:
    r = o.get("radius", size / 7)
    cy, cx = np.asarray(o["start"]) + t * np.asarray(o["velocity"])
    dy, dx = yy - cy, xx - cx
    if o["shape"] == "circle":
      m = dy ** 2 + dx ** 2 <= r * r
    elif o["shape"] == "cross":   # a plus sign, arms 0.6 r thick
      m = ((np.abs(dy) <= r) & (np.abs(dx) <= r * 0.3)) | ((np.abs(dx) <= r) & (np.abs(dy) <= r * 0.3))
    else:
      m = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    img[m] = COLORS[o["color"]]
  return img


def write_mp4(path: str, frames: list[np.ndarray], fps: int) -> None:
  """H.264 (yuv420p, near-lossless) mp4 of uint8[H, W, 3] frames."""
  h, w = frames[0].shape[:2]
  with av.open(path, "w") as out:
    s = out.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"crf": "12", "preset": "ultrafast", "g": str(max(2 * fps, 2))}
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        out.mux(p)
    for p in s.encode():
      out.mux(p)


def make_clip(rng: np.random.Generator, size: int, frames: int, grid: int = 0,
              n: int | None = None) -> list[dict]:
  """n (default: 2-3, drawn) objects with distinct shapes and colours, each moving one
  way, kept in view. grid=G: the image is G x G cells (match the ViT's patch grid);
  every object has a cell of its own and moves inside it."""
  n = int(rng.integers(2, 4)) if n is None else n
  shapes = rng.choice(SHAPES, n, replace=False)
  colors = rng.choice(list(COLORS), n, replace=False)
  dirs = rng.choice(list(DIRECTIONS), n)
  if grid:
    return _grid_clip(rng, size, frames, grid, shapes, colors, dirs)
  cells = rng.permutation(4)[:n]                       # quadrants: objects never overlap at t=0
  span = size / 4                                      # distance covered over the clip
  objects = []
  for s, c, d, cell in zip(shapes, colors, dirs, cells):
    cy, cx = (cell // 2 + 0.5) * size / 2, (cell % 2 + 0.5) * size / 2
    vy, vx = DIRECTIONS[d]
    start = (cy - vy * span / 2, cx - vx * span / 2)
    objects.append(dict(shape=str(s), color=str(c), direction=str(d), start=start,
                        velocity=(vy * span / max(frames - 1, 1), vx * span / max(frames - 1, 1))))
  return objects


def _grid_clip(rng, size, frames, grid, shapes, colors, dirs) -> list[dict]:
  cell, objects = size / grid, []
  span = GRID_SPAN * cell                                # distance covered by the kept frames
  for s, c, d, k in zip(shapes, colors, dirs, rng.permutation(grid * grid)):
    vy, vx = DIRECTIONS[d]
    cy, cx = (k // grid + 0.5) * cell, (k % grid + 0.5) * cell
    objects.append(dict(shape=str(s), color=str(c), direction=str(d),
                        start=(cy - vy * span / 2, cx - vx * span / 2),
                        velocity=(vy * span / max(frames - 1, 1), vx * span / max(frames - 1, 1)),
                        radius=GRID_RADIUS * cell))
  return objects


def question(rng: np.random.Generator, objects: list[dict], kinds, kind: str | None = None,
             obj: dict | None = None) -> tuple[str, str, str]:
  kind = kind or str(rng.choice(kinds))
  o = obj or objects[int(rng.integers(len(objects)))]
  if kind == "color":
    return kind, f"What color is the {o['shape']}?", o["color"]
  if kind == "shape":
    return kind, f"What shape is the {o['color']} object?", o["shape"]
  if kind == "count":
    return kind, "How many objects are there?", COUNTS[len(objects)]
  return kind, f"Which direction does the {o['color']} object move?", o["direction"]


def conversation(rng: np.random.Generator, objects: list[dict], kinds, turns: int) -> list[tuple[str, str, str]]:
  """`turns` questions of distinct kinds in random order, none giving away another's
  answer: the colour question is about one object (naming its shape), the shape and
  motion questions about another (naming its colour only)."""
  a, b = rng.permutation(len(objects))[:2]
  about = {"color": objects[a], "shape": objects[b], "motion": objects[b]}
  return [question(rng, objects, kinds, str(k), about.get(str(k))) for k in rng.permutation(kinds)[:turns]]


def asked_objects(truth: dict) -> list[dict]:
  """The objects a held-out question (its manifest entry) is about: all for count."""
  words = truth["qa"][0]["question"].replace("?", "").split()
  if truth["kind"] == "count":
    return list(truth["objects"])
  key = "shape" if truth["kind"] == "color" else "color"
  return [o for o in truth["objects"] if o[key] in words]


def attention_on_asked(manifest: dict, maps: np.ndarray, patch_grid: int) -> dict[str, float]:
  """Mean attention mass on the patches of the asked objects, by question kind.

  maps: float[n, T, G*G] per held-out question (manifest order), frame and patch
  (row-major G x G grid over the square frame), e.g. a model's context attention."""
  mass: dict[str, list[float]] = {}
  scale = patch_grid / manifest["size"]
  for truth, w in zip(manifest["splits"]["heldout"], maps):
    asked = asked_objects(truth)
    per_frame = []
    for t in range(len(w)):
      centres = [np.add(o["start"], np.multiply(t, o["velocity"])) for o in asked]
      per_frame.append(sum(w[t, int(y * scale) * patch_grid + int(x * scale)] for y, x in centres))
    mass.setdefault(truth["kind"], []).append(float(np.mean(per_frame)))
  return {k: float(np.mean(v)) for k, v in mass.items()}


def sample_json(sid: str, video: str, qa: list[tuple[str, str]], every_turn: bool = False) -> dict:
  """A LLaVA sample; the first question (`every_turn`: every one) starts with `<image>`."""
  turns = []
  for i, (q, a) in enumerate(qa):
    image = "<image>\n" if i == 0 or every_turn else ""
    turns += [{"from": "human", "value": image + q}, {"from": "gpt", "value": a}]
  return {"id": sid, "video": video, "conversations": turns}


def single_object_questions(rng: np.random.Generator, objects: list[dict], kinds,
                            turns: int) -> list[tuple[str, str, str]]:
  """Up to `turns` questions about a clip's only object, in random order: no count (the
  answers are "two" and "three"), and colour or shape but not both (each names the
  other's answer)."""
  ks, named = [], False
  for k in rng.permutation([k for k in kinds if k != "count"]):
    if k in ("color", "shape"):
      if named:
        continue
      named = True
    ks.append(str(k))
  return [question(rng, objects, kinds, k, objects[0]) for k in ks[:turns]]


def _write_clip(job: tuple[str, int, list[dict], int]) -> None:
  path, size, objects, frames = job
  # 2 fps, 2 * frames frames: the 1-fps rule keeps frames 0, 2, 4, ... (t = 0, 1, 2, ...)
  write_mp4(path, [draw(size, objects, k / 2) for k in range(2 * frames)], fps=2)


def generate_split(out: str, split: str, n: int, rng, *, size: int, frames: int, kinds,
                   turns: int = 1, grid: int = 0, workers: int = 1,
                   image_every_turn: bool = False, single_object: float = 0.0) -> tuple[list, list]:
  """Draws every clip and question in order (the seed fixes them), then writes the mp4s,
  in `workers` processes when > 1. A `single_object` fraction of the clips (drawn per
  clip) have one object."""
  samples, truth, jobs = [], [], []
  for i in range(n):
    single = single_object > 0 and rng.random() < single_object
    objects = make_clip(rng, size, frames, grid, n=1 if single else None)
    rel = f"videos/{split}_{i:05d}.mp4"
    jobs.append((os.path.join(out, rel), size, objects, frames))
    if single:
      qas = single_object_questions(rng, objects, kinds, turns)
    elif turns == 1:
      qas = [question(rng, objects, kinds)]
    else:
      qas = conversation(rng, objects, kinds, turns)
    samples.append(sample_json(f"{split}_{i:05d}", rel, [(q, a) for _, q, a in qas], image_every_turn))
    truth.append(dict(id=f"{split}_{i:05d}", kind=qas[0][0], answer=qas[0][2], objects=objects,
                      qa=[dict(kind=k, question=q, answer=a) for k, q, a in qas]))
  _run(_write_clip, jobs, workers, chunksize=64)
  return samples, truth


def _run(write, jobs, workers: int, chunksize: int) -> None:
  """write(job) for every job, in `workers` processes where > 1."""
  if workers > 1:
    # spawn, not fork: callers (tests) may have JAX's threads running
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      pool.map(write, jobs, chunksize=chunksize)
  else:
    for job in jobs:
      write(job)


NEEDLE_FRAMES = 3   # frames a needle is shown for
NEEDLE_QUESTION = "What color is the shape that appears?"


def needle_frame(depth: float, frames: int) -> int:
  """The first frame of the needle at `depth` in [0, 1] of a `frames`-frame clip: 0 at
  depth 0, the last NEEDLE_FRAMES frames at depth 1."""
  if frames < NEEDLE_FRAMES or not 0 <= depth <= 1:
    raise ValueError(f"needle at depth {depth} of {frames} frames: need depth in [0, 1] and "
                     f">= {NEEDLE_FRAMES} frames")
  return int(depth * (frames - NEEDLE_FRAMES))


def needle_clip(size: int, frames: int, depth: float, shape: str, color: str) -> tuple[list[np.ndarray], int]:
  """A needle-in-a-haystack clip: `frames` uint8[size, size, 3] frames (1 fps) of an
  empty still scene, with one `color` `shape` in the centre for NEEDLE_FRAMES frames from
  `needle_frame(depth, frames)` -> (frames, that first frame)."""
  at = needle_frame(depth, frames)
  needle = dict(shape=shape, color=color, start=(size / 2, size / 2), velocity=(0.0, 0.0))
  empty, lit = draw(size, [], 0), draw(size, [needle], 0)
  return [lit if at <= k < at + NEEDLE_FRAMES else empty for k in range(frames)], at


def write_needle(path: str, size: int, frames: int, depth: float, shape: str, color: str) -> int:
  """`needle_clip` written as an mp4 at 1 fps -> the needle's first frame."""
  clip, at = needle_clip(size, frames, depth, shape, color)
  write_mp4(path, clip, fps=1)
  return at


def _write_needle(job) -> None:
  write_needle(*job)


def generate_long(out: str, n: int, rng, *, size: int, frames: int | tuple[int, int],
                  depths: tuple[float, float] = (0.05, 0.95), workers: int = 1) -> tuple[list, list]:
  """Needle-in-a-haystack clips (`needle_clip`): a still scene; one shape appears for 3
  frames at a depth drawn uniformly from `depths`. `frames`: every clip's length, or
  (lo, hi): each clip's drawn log-uniformly from lo..hi (as many clips of 8-16 frames
  as of 32-64: short clips are cheap to train on)."""
  samples, truth, jobs = [], [], []
  for i in range(n):
    if isinstance(frames, int):
      f = frames
    else:
      f = min(int(np.exp(rng.uniform(np.log(frames[0]), np.log(frames[1] + 1)))), frames[1])
    depth = float(rng.uniform(*depths))
    shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
    rel = f"videos/long_{i:05d}.mp4"
    jobs.append((os.path.join(out, rel), size, f, depth, shape, color))
    samples.append(sample_json(f"long_{i:05d}", rel, [(NEEDLE_QUESTION, color)]))
    truth.append(dict(id=f"long_{i:05d}", kind="needle", answer=color, shape=shape, depth=depth,
                      frame=needle_frame(depth, f), frames=f))
  _run(_write_needle, jobs, workers, chunksize=16)
  return samples, truth


def vocabulary() -> list[str]:
  """Every word of the templates, questions and answers (punctuation attached)."""
  words = SYSTEM.split() + ["USER:", "ASSISTANT:"]
  words += "What color is the shape object object? How many objects are there? Which direction does move?".split()
  words += [f"{s}?" for s in SHAPES] + list(SHAPES) + list(COLORS) + list(DIRECTIONS) + list(COUNTS.values())
  words += ["appears?"]
  return list(dict.fromkeys(words))


def build_llm_tokenizer(out_dir: str, words: list[str]) -> None:
  """A LLaMA-like word-level tokenizer (<unk>=0, <s>=1, </s>=2, bos added, Metaspace
  words, newline its own piece) saved as a transformers PreTrainedTokenizerFast."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  pieces = ["<unk>", "<s>", "</s>", "▁", "▁\n", "\n"] + ["▁" + w for w in words]
  vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split("\n", "isolated"),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
  tok.decoder = decoders.Metaspace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                          pad_token="<unk>").save_pretrained(out_dir)


def build_qformer_tokenizer(out_dir: str, words: list[str]) -> None:
  """A WordPiece vocab.txt (lower case, punctuation split off) for BertTokenizerFast."""
  os.makedirs(out_dir, exist_ok=True)
  plain = sorted({w.lower().strip("?.,:'") for w in words} - {""})
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ".", ",", ":", "'"] + plain
  with open(os.path.join(out_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)


def generate(out: str, *, num_train: int, num_eval: int, seed: int = 0, size: int = 64, frames: int = 4,
             questions=QUESTION_TYPES, num_long: int = 0, long_frames: int | tuple[int, int] = 300,
             long_depths: tuple[float, float] = (0.05, 0.95), train_turns: int = 1,
             grid: int = 0, workers: int = 1, image_every_turn: bool = False,
             single_object: float = 0.0) -> dict:
  """Writes the dataset (see the module docstring); returns the manifest. `workers`
  processes write the mp4s (the files do not depend on it)."""
  unknown = set(questions) - set(QUESTION_TYPES)
  if unknown:
    raise ValueError(f"unknown question types {sorted(unknown)}; known: {QUESTION_TYPES}")
  if not 1 <= train_turns <= len(questions):
    raise ValueError(f"train_turns={train_turns}: between 1 and the {len(questions)} question types")
  if not 0 <= single_object < 1 or (single_object and not set(questions) - {"count"}):
    raise ValueError(f"single_object={single_object}: a fraction in [0, 1), with a question type "
                     f"other than count to ask (questions: {list(questions)})")
  if size % 2:
    raise ValueError(f"size {size}: H.264 yuv420p needs even dimensions")
  if grid and (size % grid or grid < 2):   # 2 x 2 has a cell for each of 3 objects
    raise ValueError(f"grid {grid}: must be >= 2 and divide size {size}")
  lo, hi = (long_frames, long_frames) if isinstance(long_frames, int) else long_frames
  if num_long and not NEEDLE_FRAMES <= lo <= hi:
    raise ValueError(f"long_frames={long_frames}: needs {NEEDLE_FRAMES} <= min <= max")
  if num_long and not 0 <= long_depths[0] <= long_depths[1] <= 1:
    raise ValueError(f"long_depths={long_depths}: needs 0 <= min <= max <= 1")
  os.makedirs(os.path.join(out, "videos"), exist_ok=True)
  rng = np.random.default_rng(seed)
  manifest = dict(seed=seed, size=size, frames=frames, questions=list(questions), train_turns=train_turns,
                  grid=grid, image_every_turn=image_every_turn, single_object=single_object, splits={})
  splits = [("train", num_train), ("heldout", num_eval)]
  for split, n in splits:
    samples, truth = generate_split(out, split, n, rng, size=size, frames=frames, kinds=list(questions),
                                    turns=train_turns if split == "train" else 1, grid=grid, workers=workers,
                                    image_every_turn=image_every_turn,
                                    single_object=single_object if split == "train" else 0.0)
    _dump(os.path.join(out, f"{split}.json"), samples)
    manifest["splits"][split] = truth
    if split == "heldout":
      _dump(os.path.join(out, "heldout_qa.json"), video_qa_questions(samples))
  if num_long:
    samples, truth = generate_long(out, num_long, rng, size=size, frames=long_frames, depths=tuple(long_depths),
                                   workers=workers)
    _dump(os.path.join(out, "long.json"), samples)
    _dump(os.path.join(out, "long_qa.json"), video_qa_questions(samples))
    manifest["splits"]["long"] = truth
  words = vocabulary()
  build_llm_tokenizer(os.path.join(out, "tokenizers", "llm"), words)
  build_qformer_tokenizer(os.path.join(out, "tokenizers", "qformer"), words)
  _dump(os.path.join(out, "manifest.json"), manifest)
  return manifest


def video_qa_questions(samples: list[dict]) -> list[dict]:
  """Single-question LLaVA samples -> the MSVD-QA / MSRVTT-QA question file layout
  ({video_id, question, answer, id}; the video is DIR/videos/{video_id}.mp4), so that
  `python -m eval.run msvd_qa --question-file DIR/heldout_qa.json --video-folder
  DIR/videos` asks the held-out questions the benchmarks' way."""
  out = []
  for s in samples:
    human, gpt = s["conversations"][:2]
    out.append(dict(video_id=os.path.splitext(os.path.basename(s["video"]))[0], id=s["id"],
                    question=human["value"].replace("<image>", "").strip(), answer=gpt["value"]))
  return out


def _dump(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)


def _int_range(s: str) -> int | tuple[int, int]:
  """"300" -> 300, "16-64" -> (16, 64) (argparse type)."""
  lo, dash, hi = s.partition("-")
  return (int(lo), int(hi)) if dash else int(s)


def _float_range(s: str) -> tuple[float, float]:
  """"0-1" -> (0.0, 1.0) (argparse type)."""
  lo, dash, hi = s.partition("-")
  if not dash:
    raise argparse.ArgumentTypeError(f"{s!r}: expected MIN-MAX")
  return float(lo), float(hi)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True)
  ap.add_argument("--num-train", type=int, default=2000)
  ap.add_argument("--num-eval", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--frames", type=int, default=4)
  ap.add_argument("--questions", default=",".join(QUESTION_TYPES))
  ap.add_argument("--long", type=int, default=0, help="number of long needle clips")
  ap.add_argument("--long-frames", type=_int_range, default=300,
                  help="frames (1 fps) of every long clip, or MIN-MAX: each clip's drawn log-uniformly")
  ap.add_argument("--long-depths", type=_float_range, default=(0.05, 0.95),
                  help="MIN-MAX: the range (fractions of the clip) the needles' depths are drawn from")
  ap.add_argument("--train-turns", type=int, default=1, help="questions per training clip (multi-turn)")
  ap.add_argument("--grid", type=int, default=0,
                  help="one object per cell of a GxG grid, moving inside it (set to the ViT's patch grid, "
                       "e.g. 4 at 56 px / 14)")
  ap.add_argument("--image-every-turn", action="store_true",
                  help="multi-turn clips: an <image> at the start of every question (imgsp_v1 data), "
                       "not only the first")
  ap.add_argument("--single-object", type=float, default=0.0,
                  help="fraction of training clips with one object (no count question; held-out clips "
                       "always have 2-3)")
  ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing the mp4s")
  a = ap.parse_args(argv)
  m = generate(a.out, num_train=a.num_train, num_eval=a.num_eval, seed=a.seed, size=a.size, frames=a.frames,
               questions=a.questions.split(","), num_long=a.long, long_frames=a.long_frames,
               long_depths=a.long_depths,
               train_turns=a.train_turns, grid=a.grid, workers=a.workers, image_every_turn=a.image_every_turn,
               single_object=a.single_object)
  print(f"wrote {sum(len(v) for v in m['splits'].values())} clips to {a.out}")


if __name__ == "__main__":
  main()
