"""MME (14 yes/no subtasks, two questions per image).

Files: --question-file `llava_mme.jsonl` ({question_id: "{category}/{image file}",
image, text, category} per line), --image-folder `MME_Benchmark_release_version`.
Answers come from the benchmark's own folder (--gt-dir, default the image folder):
`{category}/questions_answers_YN/{image stem}.txt` (categories with an `images/`
subfolder) or `{category}/{image stem}.txt`, lines "question<TAB>Yes|No". A question is
looked up as the release's `convert_answer_to_mme.py` does: "Answer the question using
a single word or phrase." is removed from the prompt; " Please answer yes or no." is
appended when absent (with two spaces if the one-space form is not in the file).
An `answer` field in the question line is used when no answer file has the question.
Predictions: `model_vqa_loader.py`'s answer lines (common.llava_record).

Score (the MME tool's `calculation.py`): the prediction, lowercased, is "yes" / "no" if
it is exactly that, else "yes" if its first 4 characters contain "yes", else "no" if
they contain "no", else "other" (always wrong). Per subtask: acc = right answers /
questions and acc+ = images with both questions right / images, score = 100 * (acc +
acc+); `perception` and `cognition` sum the subtasks' scores (10 and 4 of them; the
paper's MME figure is perception). The release pairs questions by consecutive lines of
a category; here by image (question_id), the same pairs when an image's two questions
are adjacent. Questions without an answer are counted as `no_answer` and left out.
"""

from __future__ import annotations

import os
from collections import defaultdict

from eval.benchmarks.common import add_llava_arguments, load_llava_jsonl, llava_record, ratio, read_jsonl

KIND = "generate"
ID_FIELD = "question_id"
GENERATION = dict(temperature=0.0, max_new_tokens=128)
FILES = {"question_file": ("file", "run"), "image_folder": ("dir", "run"), "gt_dir": ("dir", "")}
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUFFIX = "Answer the question using a single word or phrase."
YN = "Please answer yes or no."


def add_arguments(parser) -> None:
  add_llava_arguments(parser, "MME_Benchmark_release_version")
  parser.add_argument("--gt-dir", "--gt", dest="gt_dir", default=None,
                      help="MME_Benchmark_release_version holding the answer .txt files (default --image-folder)")


def load(args):
  return load_llava_jsonl(args.question_file, args.image_folder)


record = llava_record


def read_answers(root: str) -> dict[tuple[str, str, str], str]:
  """(category, "{image stem}.txt", question) -> "Yes" / "No" from the benchmark folder."""
  gt = {}
  for cat in sorted(os.listdir(root)):
    d = os.path.join(root, cat)
    if not os.path.isdir(d):
      continue
    qa = os.path.join(d, "questions_answers_YN") if os.path.isdir(os.path.join(d, "images")) else d
    if not os.path.isdir(qa):
      continue
    for f in sorted(os.listdir(qa)):
      if f.endswith(".txt"):
        with open(os.path.join(qa, f)) as fh:
          for line in fh:
            if line.strip():
              question, answer = line.strip().split("\t")
              gt[(cat, f, question)] = answer
  return gt


def lookup(gt: dict, category: str, qid: str, prompt: str):
  file = os.path.splitext(qid.split("/")[-1])[0] + ".txt"
  q = prompt.replace(SUFFIX, "").strip() if SUFFIX in prompt else prompt
  if YN not in q:
    q = q + " " + YN
    if (category, file, q) not in gt:
      q = q.replace(" " + YN, "  " + YN)
  return gt.get((category, file, q))


def parse(pred: str) -> str:
  p = pred.lower()
  if p in ("yes", "no"):
    return p
  return "yes" if "yes" in p[:4] else "no" if "no" in p[:4] else "other"


def score(records: list[dict], args) -> dict:
  root = getattr(args, "gt_dir", None) or getattr(args, "image_folder", None)
  gt = read_answers(root) if root and os.path.isdir(root) else {}
  inline = {}
  if getattr(args, "question_file", None) and os.path.isfile(args.question_file):
    inline = {q["question_id"]: q["answer"] for q in read_jsonl(args.question_file)[0] if "answer" in q}
  by_cat = defaultdict(lambda: defaultdict(list))   # category -> image -> [right?]
  no_answer = 0
  for r in records:
    qid = str(r["question_id"])
    cat = qid.split("/")[0]
    ans = lookup(gt, cat, qid, r.get("prompt", "")) or inline.get(r["question_id"])
    if ans is None:
      no_answer += 1
      continue
    by_cat[cat][qid].append(parse(r["text"]) == ans.lower())
  tasks = {}
  for cat, images in by_cat.items():
    answers = [ok for oks in images.values() for ok in oks]
    acc = ratio(sum(answers), len(answers))
    acc_plus = ratio(sum(all(oks) and len(oks) == 2 for oks in images.values()), len(images))
    tasks[cat] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus),
                  "questions": len(answers), "images": len(images)}
  return {"perception": sum(tasks[c]["score"] for c in PERCEPTION if c in tasks),
          "cognition": sum(tasks[c]["score"] for c in COGNITION if c in tasks),
          "tasks": tasks, "count": len(records), "no_answer": no_answer}
