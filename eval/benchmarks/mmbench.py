"""MMBench (multiple choice, A-D; dev answers local, test answers on the server).

File: --question-file, the benchmark's TSV (`mmbench_dev_20230712.tsv`): columns index,
question, hint, A, B, C, D, answer (dev only), category, image (base64 JPEG / PNG, or
the index of the row that holds it), source, l2-category, comment, split. An empty
cell or one of pandas' missing-value words (nan, None, NULL, N/A, ...) counts as absent
(the release reads the TSV with pandas); the options are A, B, ... up to the first
absent one. Images are decoded once into --image-cache (default a folder under the
system temp dir named after the TSV) as `{index}.jpg|png`; that file is the Item's media.

Prompt (`model_vqa_mmbench.py` with --single-pred-prompt, as mmbench.sh runs it): the
hint and a newline when present, the question, then "\\nA. option" per option; this
text is the Q-Former instruction; the LLM text adds "\\nAnswer with the option's letter
from the given choices directly." (--lang cn: the release's Chinese line). With
--all-rounds each question is also asked with its options rotated by 1..n-1 (letters
stay A, B, ...), ids `{index}_r{k}` (records carry `key`).
Records: {question_id: index, round_id, prompt, text, options, option_char, answer_id,
model_id, metadata} (the release's line).

`export` writes the submission table as `convert_mmbench_for_submission.py` builds it,
as TSV: the TSV's columns less hint, category, source, image, comment, l2-category,
with `prediction` (the last record's text for that index) inserted as the 7th column.

Score (answers present): an answer's letter is (1) the text's leading letter, alone or
followed by ".", ")", ":", "," or a space, optionally in "(...)"; else (2) the letter of
the one option whose text equals the answer (case and a final "." ignored); else (3) the
letter of the one option whose text occurs in the answer; else none (wrong). Circular
evaluation (MMBench's): rows are grouped by index % 1,000,000 (the circular copies of
a question, and the --all-rounds rotations); a group is right when every row and round
in it is. `circular` and `vanilla` (index < 1e6, round 0 only) accuracies in percent,
and the circular accuracy per category.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import re
import sys
import tempfile
from collections import defaultdict

from eval.benchmarks.common import SINGLE_LETTER, Item, answer_id, keyed

KIND = "generate"
ID_FIELD = "question_id"
GENERATION = dict(temperature=0.0, max_new_tokens=1024)
FILES = {"question_file": ("file", "run score"), "image_cache": ("dir", "")}
LETTERS = ["A", "B", "C", "D"]
CN_LETTER = "\u8bf7\u76f4\u63a5\u56de\u7b54\u9009\u9879\u5b57\u6bcd\u3002"   # the release's --lang cn line
NA = {"", "nan", "none", "null", "n/a", "na", "<na>", "#n/a", "#n/a n/a", "#na", "-nan", "-1.#ind",
      "-1.#qnan", "1.#ind", "1.#qnan"}
DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def add_arguments(parser) -> None:
  parser.add_argument("--question-file", help="MMBench TSV with base64 images")
  parser.add_argument("--image-cache", help="folder for the decoded images (default under the temp dir)")
  parser.add_argument("--lang", default="en", choices=("en", "cn"))
  parser.add_argument("--all-rounds", action="store_true", help="also ask each question with rotated options")


def absent(v) -> bool:
  return v is None or str(v).strip().lower() in NA


def read_tsv(path: str) -> tuple[list[str], list[dict]]:
  csv.field_size_limit(sys.maxsize)
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t"))
  if not rows or "index" not in rows[0]:
    raise ValueError(f"{path}: not an MMBench TSV (no 'index' column)")
  header = rows[0]
  return header, [dict(zip(header, r)) for r in rows[1:] if r]


def options(row: dict) -> list[str]:
  out = []
  for c in LETTERS:
    if absent(row.get(c)):
      break
    out.append(row[c])
  return out


def _cache_dir(args) -> str:
  if args.image_cache:
    return args.image_cache
  st = os.stat(args.question_file)
  tag = hashlib.sha1(f"{os.path.abspath(args.question_file)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
  return os.path.join(tempfile.gettempdir(), f"llamavid-mmbench-{tag[:12]}")


def _image_file(folder: str, index: str, b64: str) -> str:
  data = base64.b64decode(b64)
  ext = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"
  path = os.path.join(folder, f"{index}.{ext}")
  if not os.path.isfile(path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  return path


def load(args) -> list[Item]:
  _, rows = read_tsv(args.question_file)
  folder = _cache_dir(args)
  os.makedirs(folder, exist_ok=True)
  by_index = {r["index"]: r for r in rows}
  suffix = CN_LETTER if args.lang == "cn" else SINGLE_LETTER
  items = []
  for row in rows:
    img = row.get("image", "")
    if img.isdigit() and img in by_index and len(img) < 16:
      img = by_index[img]["image"]
    media = _image_file(folder, row["index"], img)
    opts = options(row)
    chars = LETTERS[:len(opts)]
    for r in range(len(opts) if args.all_rounds else 1):
      q = row["question"] if absent(row.get("hint")) else row["hint"] + "\n" + row["question"]
      q += "".join(f"\n{c}. {o}" for c, o in zip(LETTERS, opts))
      iid = row["index"] if r == 0 else f"{row['index']}_r{r}"
      items.append(Item(iid, q + "\n" + suffix, q, media, "image",
                        {"index": int(row["index"]), "round": r, "options": opts, "option_char": chars}))
      opts, chars = opts[1:] + opts[:1], chars[1:] + chars[:1]
  return items


def record(item: Item, pred: str, model_id: str = "llamavid-jax") -> dict:
  m = item.meta
  rec = {"question_id": m["index"], "round_id": m["round"], "prompt": item.instruction, "text": pred,
         "options": m["options"], "option_char": m["option_char"], "answer_id": answer_id(),
         "model_id": model_id, "metadata": {}}
  return keyed(rec, item, m["index"])


def parse(text: str, opts: list[str]) -> str:
  """The answer's option letter, or "" (see the module docstring)."""
  t = text.strip()
  valid = LETTERS[:len(opts)]
  m = re.match(r"^\(?([A-D])\)?(?:[.):,\s]|$)", t)
  if m and m.group(1) in valid:
    return m.group(1)
  low = t.lower().rstrip(".").strip()
  same = [c for c, o in zip(valid, opts) if o.strip().lower().rstrip(".") == low]
  if len(same) == 1:
    return same[0]
  inside = [c for c, o in zip(valid, opts) if o.strip() and o.strip().lower() in t.lower()]
  return inside[0] if len(inside) == 1 else ""


def export(records: list[dict], path: str, args) -> int:
  header, rows = read_tsv(args.question_file)
  preds = {}
  for r in records:
    preds[str(r["question_id"])] = r["text"]
  cols = [c for c in header if c not in DROPPED]
  cols.insert(6, "prediction")
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(cols)
    for row in rows:
      w.writerow([preds.get(row["index"], "") if c == "prediction" else row.get(c, "") for c in cols])
  return len(rows)


def score(records: list[dict], args) -> dict:
  if not getattr(args, "question_file", None):
    return {"count": len(records), "note": "needs --question-file (the TSV with answers)"}
  _, rows = read_tsv(args.question_file)
  truth = {int(r["index"]): r for r in rows if not absent(r.get("answer"))}
  if not truth:
    return {"count": len(records), "note": "the TSV has no answers (test split: submit the export)"}
  groups = defaultdict(list)
  vanilla = []
  for rec in records:
    row = truth.get(int(rec["question_id"]))
    if row is None:
      continue
    opts = options(row)
    rnd = int(rec.get("round_id", 0))
    right = LETTERS[(LETTERS.index(row["answer"].strip()) - rnd) % len(opts)]
    shown = opts[rnd:] + opts[:rnd]
    ok = parse(rec["text"], shown) == right
    groups[int(rec["question_id"]) % 1_000_000].append(ok)
    if int(rec["question_id"]) < 1_000_000 and rnd == 0:
      vanilla.append(ok)
  cat_of = {int(r["index"]) % 1_000_000: r.get("category", "") for r in truth.values()}
  by_cat = defaultdict(list)
  for g, oks in groups.items():
    by_cat[cat_of.get(g, "")].append(all(oks))
  pct = lambda v: 100.0 * sum(v) / len(v) if v else 0.0   # noqa: E731
  return {"circular": pct([all(v) for v in groups.values()]), "vanilla": pct(vanilla),
          "groups": len(groups), "count": sum(len(v) for v in groups.values()),
          "categories": {c: pct(v) for c, v in sorted(by_cat.items())}}
