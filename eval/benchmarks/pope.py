"""POPE (object hallucination, yes/no questions on COCO val2014).

Files: --question-file `llava_pope_test.jsonl` ({question_id, image, text, category}
per line, category one of adversarial / popular / random), --image-folder (val2014),
--annotation-dir holding `coco_pope_{category}.json`: JSON lines {question_id, image,
text, label: "yes" | "no"}.
Predictions: `model_vqa_loader.py`'s answer lines (common.llava_record).

Score, per category (as `eval_pope.py`): an answer is "no" when its first sentence (the
text before the first ".") with commas removed, split on spaces, has the word `No`,
`no` or `not`; otherwise "yes". accuracy, precision, recall, f1 (positive: yes) and
yes_ratio (the share of "yes" answers) are fractions; a zero denominator gives 0 (the
release divides by zero). Also `mean` over the categories (the paper's POPE figure is
the mean F1, in percent).

Pairing: the release pairs the category's answers with the label file's lines by
position (right only when the answers come in the label file's order). Here an answer
is joined to its question by question_id and the question to its label by (image, the
text's first line); a question whose text is not in the label file falls back to the
label with its question_id. Answers without a label are counted as `unlabelled`;
labels without an answer as `unanswered`.
"""

from __future__ import annotations

import logging
import os

from eval.benchmarks.common import (add_llava_arguments, load_llava_jsonl, llava_record, ratio,
                                    read_jsonl)

log = logging.getLogger("eval.benchmarks")

KIND = "generate"
ID_FIELD = "question_id"
GENERATION = dict(temperature=0.0, max_new_tokens=128)   # pope.sh: --temperature 0; 128 new tokens
FILES = {"question_file": ("file", "run score"), "image_folder": ("dir", "run"),
         "annotation_dir": ("dir", "score")}


def add_arguments(parser) -> None:
  add_llava_arguments(parser, "COCO val2014 images")
  parser.add_argument("--annotation-dir", "--annotations", dest="annotation_dir",
                      help="folder of coco_pope_{adversarial,popular,random}.json label files")


def load(args):
  return load_llava_jsonl(args.question_file, args.image_folder)


record = llava_record


def yes_no(text: str) -> str:
  """The release's parsing: "no" if the first sentence has the word No / no / not."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _content(q: dict):
  return (q.get("image"), str(q.get("text", "")).split("\n")[0].strip())


def label_files(annotation_dir: str) -> dict[str, str]:
  out = {}
  for f in sorted(os.listdir(annotation_dir)):
    if f.startswith("coco_pope_") and f.endswith(".json"):
      out[f[len("coco_pope_"):-len(".json")]] = os.path.join(annotation_dir, f)
    else:
      log.warning("%s: not a coco_pope_*.json label file, ignored", os.path.join(annotation_dir, f))
  return out


def metrics(pairs: list[tuple[str, str]]) -> dict:
  """[(pred, label)] of "yes" / "no" -> the release's figures."""
  tp = sum(p == "yes" and g == "yes" for p, g in pairs)
  fp = sum(p == "yes" and g == "no" for p, g in pairs)
  tn = sum(p == "no" and g == "no" for p, g in pairs)
  fn = sum(p == "no" and g == "yes" for p, g in pairs)
  precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
  return {"accuracy": ratio(tp + tn, tp + tn + fp + fn), "precision": precision, "recall": recall,
          "f1": ratio(2 * precision * recall, precision + recall),
          "yes_ratio": ratio(sum(p == "yes" for p, _ in pairs), len(pairs)),
          "count": len(pairs), "TP": tp, "FP": fp, "TN": tn, "FN": fn}


def score(records: list[dict], args) -> dict:
  if not getattr(args, "annotation_dir", None) or not getattr(args, "question_file", None):
    return {"count": len(records), "note": "needs --question-file and --annotation-dir"}
  questions = {q["question_id"]: q for q in read_jsonl(args.question_file)[0]}
  out, unknown = {}, sum(r["question_id"] not in questions for r in records)
  for cat, path in label_files(args.annotation_dir).items():
    labels = read_jsonl(path)[0]
    by_content = {_content(l): l["label"] for l in labels}
    by_id = {l.get("question_id"): l["label"] for l in labels}
    pairs, seen, unlabelled = [], set(), 0
    for r in records:
      q = questions.get(r["question_id"])
      if q is None or q.get("category") != cat or r["question_id"] in seen:
        continue
      seen.add(r["question_id"])
      label = by_content.get(_content(q), by_id.get(q["question_id"]))
      if label is None:
        unlabelled += 1
        continue
      pairs.append((yes_no(r["text"]), "no" if label == "no" else "yes"))
    out[cat] = {**metrics(pairs), "unlabelled": unlabelled, "unanswered": len(labels) - len(pairs)}
  cats = list(out)
  out["mean"] = {k: ratio(sum(out[c][k] for c in cats), len(cats))
                 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
  out["unknown_question_ids"] = unknown
  return out
