"""Benchmark runner: predictions in the release's layout, resumable, chunked, scored.

  python -m eval.run BENCH --ckpt DIR --out PRED [bench flags] [--num-chunks K --chunk-idx I]
      [--limit N] [--batch-size B] [--summary SUMMARY.json] [--export FILE]
  python -m eval.run BENCH --merge --out MERGED PRED.0 PRED.1 ...      (or a quoted glob)
  python -m eval.run BENCH --score-only --pred PRED [bench flags] [--out SUMMARY.json] [--export FILE]

BENCH is one of eval.benchmarks.BENCHMARKS; `python -m eval.run BENCH -h` lists its
flags. Every missing or bad file and flag is named before a model is loaded.

Chunks: the item list is cut as the release's `get_chunk` does (K contiguous parts of
ceil(n / K) items; common.split_list). Without --num-chunks, under several JAX
processes (`--distributed` calls jax.distributed.initialize first) process i of P takes
chunk i of P and writes PRED.{P}_{i} (unless PRED holds `{chunk_idx}` / `{num_chunks}`,
which are filled in, as they are with explicit chunks). --merge concatenates chunk
files in the order given (a glob: in natural order of its names) and keeps the first
record of each key.

Resume: the records already in PRED are kept and their items skipped; each new record
is appended and flushed as it is produced, so a kill loses at most the answers in flight
(the model's predictor answers through the serving engine, `eval/predict.py`: `--batch-size`
decode slots, each taking the next question as soon as its answer ends; answers are
written in the items' order).
A torn last line (a kill mid-write) is dropped, with a warning, before appending.
Items whose media file is missing are named, counted and skipped; so are items the
predictor could not read (it returns None for them); a rerun retries both.

Devices (`--mesh`, `eval/args.py`): `--mesh tensor=N` (or fsdp=F,tensor=T) splits the
model for one that does not fit a device; `--mesh data=N` replicates it, but the
engine's decode slots are not split over the N devices (each runs every slot), so data
parallelism buys eval.run no speed yet; both combine (data=2,tensor=4). Predictions
equal one device's (greedy).

Summary (printed, and written to --summary): {benchmark, metric, counts: {items,
predicted, skipped_existing, missing_media, failed}, missing_media: [[id, path]],
seconds, questions_per_second, chunk: [I, K], pred}; `metric` scores every record in
PRED. With --score-only, the metric of PRED's records (a file the release's scripts
wrote reads the same) goes to --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
import time
from typing import Protocol, Sequence

from eval import args as eval_args
from eval.benchmarks import BENCHMARKS
from eval.benchmarks.common import Item, check_media, check_paths, default_key, get_chunk, read_jsonl
from llamavid_jax import cli, validation

log = logging.getLogger("eval.run")


class Predictor(Protocol):
  """`predict` at least; `run` takes `answers(items)` (an iterator of the answers in
  order, each as soon as it is done) instead when there is one, and calls `close()`
  on a predictor it made (`answered`)."""

  def predict(self, items: list[Item]) -> list[str | None]:
    """One answer per item (None: the item's media could not be used)."""


# --- the model side -----------------------------------------------------------------
def model_predictor(args):
  """The checkpoint as a Predictor (`eval.predict`): each item's media read, its prompt
  asked with `<image>\\n` before it (none for a text-only item) and its instruction as
  the Q-Former text, through an engine of `--batch-size` decode slots with the
  benchmark's (or the flags') sampling; an unreadable media file gives None (counted as
  failed). `run` closes it."""
  from eval.predict import Predictor as ModelPredictor
  m = eval_args.load(args)
  given = getattr(args, "max_new_tokens_given", True)
  if given:   # the answer alone must fit beside the shortest prompt: refused before anything compiles
    validation.check_positions(m.cfg, prompt_ids=1, num_frames=0, max_new_tokens=args.max_new_tokens,
                               what="--max-new-tokens")
  return ModelPredictor(m, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, fit_max_new_tokens=not given)


# --- arguments ----------------------------------------------------------------------
def build_parser(bench: str | None) -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m eval.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("benchmark", choices=sorted(BENCHMARKS))
  p.add_argument("inputs", nargs="*", default=[], help="--merge: chunk prediction files (or a quoted glob)")
  eval_args.add_model_flags(p, dtype="bfloat16", ckpt_required=False)   # --ckpt --dtype --mesh --quant
  p.add_argument("--out", help="prediction file (run, merge) or summary JSON (--score-only)")
  p.add_argument("--merge", action="store_true")
  p.add_argument("--score-only", action="store_true")
  p.add_argument("--pred", help="--score-only: prediction file (ours or the release's)")
  p.add_argument("--num-chunks", type=int)
  p.add_argument("--chunk-idx", type=int, default=0)
  p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() before chunking")
  p.add_argument("--limit", type=int, help="only the first N items of the chunk")
  p.add_argument("--batch-size", type=int, default=8,
                 help="the engine's decode slots: questions answered at once, a freed slot taking the next")
  p.add_argument("--summary", help="where to write the summary JSON (run)")
  p.add_argument("--export", help="also write the release's downstream file (GQA predictions, submissions)")
  eval_args.add_sampling_flags(p, new_tokens="the benchmark's (the release's), or as many as the model's "
                              "positions leave", temperature="the benchmark's (the release's)", top_p="1.0",
                              prefill=False)
  p.add_argument("--model-id", help="model_id in LLaVA-style records (default: the --ckpt folder's name)")
  p.add_argument("--no-progress", action="store_true")
  if bench in BENCHMARKS:
    BENCHMARKS[bench].add_arguments(p.add_argument_group(f"{bench} files"))
  return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
  p = build_parser(argv[0] if argv else None)   # BENCH comes first: it decides the flags
  args = p.parse_intermixed_args(argv)
  mod = BENCHMARKS[args.benchmark]
  mode = "score" if args.score_only else "merge" if args.merge else "run"
  errs = []
  if args.merge and args.score_only:
    errs.append("--merge and --score-only exclude each other")
  if mode == "merge":
    if not args.out:
      errs.append("--merge needs --out MERGED")
    if not args.inputs:
      errs.append("--merge needs chunk files")
  elif args.inputs:
    errs.append(f"unexpected arguments {args.inputs} (chunk files go with --merge)")
  if mode == "score":
    if not args.pred:
      errs.append("--score-only needs --pred FILE")
    elif not os.path.isfile(args.pred):
      errs.append(f"--pred {args.pred}: no such file")
  if mode == "run":
    if not args.ckpt:
      errs.append("--ckpt is required")
    elif not os.path.exists(args.ckpt):
      errs.append(f"--ckpt {args.ckpt}: no such file or folder")
    if not args.out:
      errs.append("--out PRED is required")
    if args.num_chunks is not None and not 0 <= args.chunk_idx < args.num_chunks:
      errs.append(f"--chunk-idx {args.chunk_idx} is not in [0, --num-chunks {args.num_chunks})")
    if args.batch_size < 1:
      errs.append("--batch-size must be >= 1")
    if args.limit is not None and args.limit < 0:
      errs.append("--limit must be >= 0")
  if mode != "merge":
    errs += check_paths(mod.FILES, args, mode)
    if hasattr(mod, "check"):
      errs += mod.check(args, mode)
  if args.export and not hasattr(mod, "export"):
    errs.append(f"--export: {args.benchmark} has no downstream file (its predictions are the release's file)")
  errs += validation.check_sampling(temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens)
  errs += check_outputs(mod, args, mode)
  if errs:
    p.error("; ".join(errs))
  eval_args.check_model_flags(p, args)
  gen = mod.GENERATION
  args.max_new_tokens_given = args.max_new_tokens is not None   # else the benchmark's, cut to the positions left
  args.max_new_tokens = gen["max_new_tokens"] if args.max_new_tokens is None else args.max_new_tokens
  args.temperature = gen["temperature"] if args.temperature is None else args.temperature
  args.top_p = 1.0 if args.top_p is None else args.top_p
  args.model_id = args.model_id or os.path.basename(os.path.normpath(args.ckpt or "llamavid-jax"))
  return args, p


def check_outputs(mod, args, mode: str) -> list[str]:
  """Problems with the files this run writes: none may be (or be the same file as) an
  input (the benchmark's question / answer files, --pred, the chunk files), nor another
  output (--summary over the predictions)."""
  inputs = {"--" + name.replace("_", "-"): getattr(args, name, None)
            for name, (kind, _) in mod.FILES.items() if kind == "file"}
  if mode == "score":
    inputs["--pred"] = args.pred
  if mode == "merge":
    inputs.update({f"chunk file {x}": x for x in args.inputs if os.path.isfile(x)})
  errs = []
  outs = {"--out": args.out, "--summary": args.summary if mode == "run" else None, "--export": args.export}
  for flag, path in outs.items():
    errs += validation.check_out(path, inputs, flag)
  if mode == "run":
    pred = {"--out": args.out}
    errs += validation.check_out(args.summary, pred, "--summary") + validation.check_out(args.export, pred, "--export")
  elif mode == "score":
    errs += validation.check_out(args.export, {"--out": args.out}, "--export")
  return errs


# --- prediction files ---------------------------------------------------------------
def record_key(mod, rec: dict) -> str:
  return mod.key(rec) if hasattr(mod, "key") else default_key(rec, mod.ID_FIELD)


def read_records(path: str, *, repair: bool = False) -> list[dict]:
  """A prediction file's records; with `repair`, a torn last line is also cut off the file."""
  with open(path) as f:
    head = f.read(1).lstrip()
  if head == "[":   # some release files are one JSON list
    from eval.benchmarks.common import read_json_or_jsonl
    return read_json_or_jsonl(path)
  recs, good = read_jsonl(path)
  if good is not None and repair:
    with open(path, "r+b") as f:
      f.truncate(good)
  return recs


def natural(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def merge(mod, inputs: Sequence[str], out: str) -> dict:
  files = []
  for x in inputs:
    if any(c in x for c in "*?["):
      found = sorted(glob.glob(x), key=natural)
      if not found:
        raise FileNotFoundError(f"{x}: no file matches")
      files += found
    elif not os.path.isfile(x):
      raise FileNotFoundError(f"{x}: no such file")
    else:
      files.append(x)
  seen, kept, dups = set(), [], 0
  for f in files:
    for rec in read_records(f):
      k = record_key(mod, rec)
      if k in seen:
        dups += 1
        continue
      seen.add(k)
      kept.append(rec)
  tmp = out + ".tmp"
  with open(tmp, "w") as fh:
    for rec in kept:
      fh.write(json.dumps(rec) + "\n")
  os.replace(tmp, out)
  return {"files": files, "records": len(kept), "duplicates_dropped": dups, "out": out}


# --- chunks -------------------------------------------------------------------------
def chunk_of(args) -> tuple[int, int, str]:
  """(chunk index, chunk count, prediction path)."""
  out = args.out
  if args.num_chunks is not None:
    k, i = args.num_chunks, args.chunk_idx
  else:
    import jax
    if args.distributed:
      jax.distributed.initialize()
    k, i = jax.process_count(), jax.process_index()
    if k > 1 and "{chunk_idx}" not in out:
      out = f"{out}.{k}_{i}"
  return i, k, out.replace("{chunk_idx}", str(i)).replace("{num_chunks}", str(k))


# --- the run ------------------------------------------------------------------------
def run(args, predictor: Predictor | None = None) -> dict:
  mod = BENCHMARKS[args.benchmark]
  idx, num, out = chunk_of(args)
  items = get_chunk(mod.load(args), num, idx)
  if args.limit is not None:
    items = items[:args.limit]
  ok, missing = check_media(items)
  if missing:   # one line, however many (a half-copied media folder names thousands)
    log.warning("%s; they are skipped", validation.capped(f"of {len(items):,} items have no media file",
                                                          [f"{i}: {p}" for i, p in missing]))
  done = set()
  if os.path.exists(out):
    done = {record_key(mod, r) for r in read_records(out, repair=True)}
  todo = [it for it in ok if it.id not in done]
  predicted = failed = 0
  seconds = 0.0
  if todo:
    own = predictor is None   # made here: closed here
    predictor = predictor or (mod.predictor(args) if hasattr(mod, "predictor") else model_predictor(args))
    from tqdm import tqdm
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    start = time.perf_counter()
    try:
      with open(out, "a") as f, tqdm(total=len(todo), unit="q", disable=args.no_progress,
                                     desc=args.benchmark) as bar:
        for n, (it, pred) in enumerate(answered(predictor, todo, args.batch_size), 1):
          bar.update(1)
          if pred is None:
            failed += 1
            if failed <= 5:
              log.warning("%s: no answer (media unreadable or too long), skipped", it.id)
          else:
            rec = mod.record(it, pred, model_id=args.model_id)
            if record_key(mod, rec) != it.id:
              raise RuntimeError(f"{args.benchmark}: record key {record_key(mod, rec)!r} != item id {it.id!r}")
            f.write(json.dumps(rec) + "\n")
            f.flush()
            predicted += 1
          if n % args.batch_size == 0 or n == len(todo):
            os.fsync(f.fileno())
    finally:
      if own and hasattr(predictor, "close"):
        predictor.close()
    seconds = time.perf_counter() - start
    if failed > 5:   # one line for the rest
      said = getattr(predictor, "summary", lambda: None)()
      log.warning("%s", said or f"{failed:,} items had no answer and were skipped (a rerun retries them)")
  records = read_records(out) if os.path.exists(out) else []
  summary = {"benchmark": args.benchmark, "metric": mod.score(records, args),
             "counts": {"items": len(items), "predicted": predicted,
                        "skipped_existing": sum(it.id in done for it in ok),
                        "missing_media": len(missing), "failed": failed},
             "missing_media": [list(m) for m in missing],
             "seconds": seconds, "questions_per_second": predicted / seconds if seconds else 0.0,
             "chunk": [idx, num], "pred": out}
  if args.export:
    summary["export"] = {"path": args.export, "entries": mod.export(records, args.export, args)}
  if args.summary:
    write_json(args.summary, summary)
  return summary


def answered(predictor: Predictor, items: list[Item], batch_size: int):
  """(item, answer) in the items' order: from the predictor's `answers(items)` when it
  has one (eval.predict's: each answer as soon as it is done, the engine kept full),
  else from `predict` on `batch_size` items at a time."""
  if hasattr(predictor, "answers"):
    yield from zip(items, predictor.answers(items), strict=True)
    return
  for b in range(0, len(items), batch_size):
    batch = items[b:b + batch_size]
    preds = predictor.predict(batch)
    if len(preds) != len(batch):
      raise RuntimeError(f"predictor gave {len(preds)} answers for {len(batch)} items")
    yield from zip(batch, preds)


def score_only(args) -> dict:
  mod = BENCHMARKS[args.benchmark]
  records = read_records(args.pred)
  try:
    metric = mod.score(records, args)
  except KeyError as e:   # another benchmark's (or no benchmark's) records
    raise ValueError(f"--pred {args.pred}: a record has no {e} field; are these {args.benchmark} "
                     "predictions?") from None
  summary = {"benchmark": args.benchmark, "metric": metric,
             "counts": {"records": len(records)}, "pred": args.pred}
  if args.export:
    summary["export"] = {"path": args.export, "entries": mod.export(records, args.export, args)}
  if args.out:
    write_json(args.out, summary)
  return summary


def write_json(path: str, obj) -> None:
  """`obj` as indented JSON, through a temporary file and a rename."""
  validation.write_atomic(path, json.dumps(obj, indent=2) + "\n")


def main(argv: Sequence[str] | None = None, predictor: Predictor | None = None) -> dict:
  cli.log_to_console()
  args, p = parse_args(list(sys.argv[1:] if argv is None else argv))
  try:
    if args.merge:
      result = merge(BENCHMARKS[args.benchmark], args.inputs, args.out)
    elif args.score_only:
      result = score_only(args)
    else:
      result = run(args, predictor)
  except (OSError, ValueError) as e:
    p.exit(2 if isinstance(e, validation.UsageError) else 1, f"error: {cli.message(e)}\n")
  print(json.dumps(result, indent=2))
  c = result.get("counts", {})
  if (c.get("failed") or c.get("missing_media")) and not (c.get("predicted") or c.get("skipped_existing")):
    p.exit(1, f"error: no item was answered ({c.get('failed', 0):,} failed, {c.get('missing_media', 0):,} without "
              "media; see the lines above)\n")
  return result


if __name__ == "__main__":
  cli.run(main)
