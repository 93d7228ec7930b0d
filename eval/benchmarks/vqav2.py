"""VQAv2 (test-dev answers go to the EvalAI server; val answers can be scored here).

Files: --question-file `llava_vqav2_mscoco_test-dev2015.jsonl` ({question_id, image,
text, category} per line), --image-folder (test2015), --test-split
`llava_vqav2_mscoco_test2015.jsonl` (every question the submission must list; default
the question file), --annotation-file for local scoring: VQA's own annotations JSON
({annotations: [{question_id, answers: [{answer}, ...]}]}) or a JSON list / JSON lines
of {question_id, answers: [str | {answer}]}.
Predictions: `model_vqa_loader.py`'s answer lines (common.llava_record).

`export` writes the release's submission (`convert_vqav2_for_submission.py`): a JSON
list [{question_id, answer}] over the test split, in its order, the answer normalised
(vqa_norm.normalize), "" for a question without a prediction.
Score: VQA accuracy (vqa_norm.accuracy, percent) over the predictions that have
annotations, as the release's `m4c_evaluator` computes it (normalising the human
answers too; the official server's per-answer normalisation differs slightly).
"""

from __future__ import annotations

import json

from eval.benchmarks import vqa_norm
from eval.benchmarks.common import add_llava_arguments, load_llava_jsonl, llava_record, read_json, read_jsonl

KIND = "generate"
ID_FIELD = "question_id"
GENERATION = dict(temperature=0.0, max_new_tokens=128)
FILES = {"question_file": ("file", "run"), "image_folder": ("dir", "run"), "test_split": ("file", ""),
         "annotation_file": ("file", "")}


def add_arguments(parser) -> None:
  add_llava_arguments(parser, "COCO test2015 (or val2014) images")
  parser.add_argument("--test-split", help="llava_vqav2_mscoco_test2015.jsonl: the questions the submission lists")
  parser.add_argument("--annotation-file", "--annotations", "--gt", dest="annotation_file",
                      help="VQA annotations JSON, or {question_id, answers} lines, for local accuracy")


def load(args):
  return load_llava_jsonl(args.question_file, args.image_folder)


record = llava_record


def submission(records: list[dict], questions: list[dict]) -> list[dict]:
  preds = {r["question_id"]: r["text"] for r in records}
  return [{"question_id": q["question_id"],
           "answer": vqa_norm.normalize(preds[q["question_id"]]) if q["question_id"] in preds else ""}
          for q in questions]


def export(records: list[dict], path: str, args) -> int:
  split = getattr(args, "test_split", None) or getattr(args, "question_file", None)
  if not split:
    raise ValueError("vqav2 export needs --test-split or --question-file")
  sub = submission(records, read_jsonl(split)[0])
  with open(path, "w") as f:
    json.dump(sub, f)
  return len(sub)


def read_annotations(path: str) -> dict:
  """question_id -> [human answers]."""
  try:
    anns = read_json(path, "--annotation-file")
  except ValueError:   # JSON lines
    anns = read_jsonl(path)[0]
  if isinstance(anns, dict):
    anns = anns.get("annotations", [anns])
  return {a["question_id"]: [x["answer"] if isinstance(x, dict) else x for x in a["answers"]] for a in anns}


def score(records: list[dict], args) -> dict:
  if not getattr(args, "annotation_file", None):
    return {"count": len(records), "note": "needs --annotation-file for local accuracy (test-dev: EvalAI)"}
  gts = read_annotations(args.annotation_file)
  accs = [vqa_norm.accuracy(r["text"], gts[r["question_id"]]) for r in records if r["question_id"] in gts]
  return {"accuracy": 100.0 * sum(accs) / len(accs) if accs else 0.0, "count": len(accs),
          "unannotated": len(records) - len(accs)}
