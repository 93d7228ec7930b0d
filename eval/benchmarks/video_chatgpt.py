"""Video-ChatGPT's generation benchmark: general (generic_qa.json, temporal_qa.json) and
consistency (consistency_qa.json) question files.

--gt-file: a JSON list of {video_name, Q, A} (general) or {video_name, Q1, Q2, A}
(consistency: the same question asked two ways; told apart by the `Q1` key).
Videos: --video-folder/{video_name}{ext}, the first of .mp4 .avi .mov .mkv that exists.

The entries have no ids: item ids are the entry's position `n` (general) or `n.1` /
`n.2` (consistency, one item per question), and each record carries them as `key`.
Records: the entry plus `pred` (general; the release's `model_video_chatgpt_general.py`
line) or plus `pred1` / `pred2` (consistency, one record per question). `export` writes
the release's prediction file: JSON lines of the entry plus `pred`, or plus both `pred1`
and `pred2` in one line (`model_video_chatgpt_consistency.py`), in entry order.

Score: the five release scores (correctness, detail, context, temporal, consistency)
are GPT-judged (`evaluate_benchmark_*.py`; see eval.judge); `score` gives counts only.
"""

from __future__ import annotations

import json
import logging

from eval.benchmarks.common import Item, find_video, read_json

log = logging.getLogger("eval.benchmarks")

KIND = "generate"
ID_FIELD = "key"
GENERATION = dict(temperature=0.2, max_new_tokens=1024)
FILES = {"gt_file": ("file", "run"), "video_folder": ("dir", "run")}


def add_arguments(parser) -> None:
  parser.add_argument("--gt-file", "--question-file", "--gt", dest="gt_file",
                      help="generic_qa.json / temporal_qa.json / consistency_qa.json")
  parser.add_argument("--video-folder", help="Test_Videos folder")


def load(args) -> list[Item]:
  entries = read_json(args.gt_file, "--gt-file")
  if not isinstance(entries, list):
    raise ValueError(f"{args.gt_file}: expected a JSON list")
  items = []
  for n, e in enumerate(entries):
    if not isinstance(e, dict) or "video_name" not in e:
      raise ValueError(f"{args.gt_file}: entry {n} has no video_name")
    video = find_video(args.video_folder, e["video_name"], where=f"{args.gt_file}: entry {n}")
    qs = [("pred1", e["Q1"]), ("pred2", e["Q2"])] if "Q1" in e else [("pred", e.get("Q"))]
    for j, (field, q) in enumerate(qs):
      if q is None:
        raise ValueError(f"{args.gt_file}: entry {n} has no question (Q or Q1/Q2)")
      iid = f"{n}.{j + 1}" if len(qs) > 1 else str(n)
      items.append(Item(iid, q, q, video, "video", {"entry": e, "field": field, "n": n}))
  return items


def record(item: Item, pred: str, model_id: str = "") -> dict:
  return {**item.meta["entry"], item.meta["field"]: pred, "key": item.id}


def key(rec: dict) -> str:
  if "key" in rec:
    return str(rec["key"])
  return json.dumps([rec.get("video_name"), rec.get("Q", rec.get("Q1"))])


def _position(k: str) -> float:
  head = k.split(".")[0]
  return int(head) if head.isdigit() else float("inf")


def _release_lines(records: list[dict]) -> tuple[list[dict], int]:
  """(the release's lines in entry order, consistency entries with only one answer).
  Lines without a key (written by the release) keep their order, after keyed ones."""
  singles, pairs = [], {}
  for r in records:
    base = {k: v for k, v in r.items() if k != "key"}
    k = str(r.get("key", ""))
    if "Q1" in r and not ("pred1" in r and "pred2" in r):
      pairs.setdefault(k.split(".")[0], {}).update(base)
    else:
      singles.append((k, base))
  done = [(n, p) for n, p in pairs.items() if "pred1" in p and "pred2" in p]
  lines = sorted(singles + done, key=lambda kb: _position(kb[0]))
  return [b for _, b in lines], len(pairs) - len(done)


def export(records: list[dict], path: str, args=None) -> int:
  lines, left = _release_lines(records)
  if left:
    log.warning("%s: %d consistency entries lack one of their two answers and are left out", path, left)
  with open(path, "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return len(lines)


def score(records: list[dict], args=None) -> dict:
  lines, left = _release_lines(records)
  consistency = sum("Q1" in r for r in lines)
  return {"count": len(records), "entries": len(lines), "consistency_entries": consistency,
          "incomplete_pairs": left, "note": "needs judge: GPT-judged scores (eval.judge)"}
