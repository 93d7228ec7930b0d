"""GQA (testdev-balanced; open and yes/no questions answered in a word or phrase).

Files: --question-file `llava_gqa_testdev_balanced.jsonl` ({question_id, image, text,
category} per line), --image-folder (GQA images), --gt-file GQA's own
`testdev_balanced_questions.json` (questionId -> {answer, isBalanced, types:
{structural}, ...}) for scoring.
Predictions: `model_vqa_loader.py`'s answer lines (common.llava_record).

`export` writes what the release's `convert_gqa_for_eval.py` writes for GQA's
`eval.py`: a JSON list [{questionId, prediction}] in record order, prediction being
the text with trailing "." removed, lowercased.
Score (GQA `eval.py`'s accuracy): over the gt file's balanced questions (`isBalanced`,
true when absent) that have a prediction, the percentage whose prediction equals
`answer`; also `binary` and `open` (structural type "query" is open) when types are
given. GQA's script stops at a question without a prediction; here they are counted as
`missing` and left out.
"""

from __future__ import annotations

import json

from eval.benchmarks.common import add_llava_arguments, load_llava_jsonl, llava_record, read_json

KIND = "generate"
ID_FIELD = "question_id"
GENERATION = dict(temperature=0.0, max_new_tokens=128)
FILES = {"question_file": ("file", "run"), "image_folder": ("dir", "run"), "gt_file": ("file", "")}


def add_arguments(parser) -> None:
  add_llava_arguments(parser, "GQA images folder")
  parser.add_argument("--gt-file", "--gt", dest="gt_file", help="testdev_balanced_questions.json")


def load(args):
  return load_llava_jsonl(args.question_file, args.image_folder)


record = llava_record


def predictions(records: list[dict]) -> list[dict]:
  return [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in records]


def export(records: list[dict], path: str, args=None) -> int:
  preds = predictions(records)
  with open(path, "w") as f:
    json.dump(preds, f)
  return len(preds)


def score(records: list[dict], args) -> dict:
  if not getattr(args, "gt_file", None):
    return {"count": len(records), "note": "needs --gt-file (testdev_balanced_questions.json)"}
  questions = read_json(args.gt_file, "--gt-file")
  preds = {str(p["questionId"]): p["prediction"] for p in predictions(records)}
  scores = {"all": [], "binary": [], "open": []}
  missing = 0
  for qid, q in questions.items():
    if not q.get("isBalanced", True):
      continue
    if qid not in preds:
      missing += 1
      continue
    ok = preds[qid] == q["answer"]
    scores["all"].append(ok)
    structural = q.get("types", {}).get("structural")
    if structural is not None:
      scores["open" if structural == "query" else "binary"].append(ok)
  pct = lambda v: 100.0 * sum(v) / len(v) if v else 0.0   # noqa: E731
  return {"accuracy": pct(scores["all"]), "binary": pct(scores["binary"]), "open": pct(scores["open"]),
          "count": len(scores["all"]), "missing": missing,
          "not_in_gt": sum(k not in questions for k in preds)}
