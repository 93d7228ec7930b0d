"""ScienceQA (multiple choice; the paper reports the IMG subset).

Files: --question-file `llava_test_CQM-A.json`: a JSON list of {id, image?,
conversations: [{from: human, value: "Context: ...\\nQuestion: ...\\nOptions: (A) ...
(B) ...\\n<image>"}, {from: gpt, value: "The answer is A."}]}; --image-folder
(images/test, `image` is relative to it); --base-dir with ScienceQA's `problems.json`
and `pid_splits.json` for scoring (--split, default test).

Prompt (`model_vqa_science.py` with --single-pred-prompt, as sqa.sh runs it): the human
text without `<image>`, stripped, then "\\nAnswer with the option's letter from the given
choices directly."; the Q-Former instruction is the same text. Questions without an
image are asked without media (kind "none"). The model answers with a letter
(KIND generate, as the release).
Records: {question_id, prompt, text, answer_id, model_id, metadata}, prompt starting
"<image>\\n" for questions with an image (the release's `cur_prompt`).

Score (`eval_science_qa.py`): the answer is the text itself if it is one of A-E; else
its first letter if the text starts "X. "; else X from the text's one "The answer is X."
match; else FAILED. It is right when that letter's index is below the number of
choices and equals problems.json's `answer`. Every problem of the split counts
(FAILED when there is no prediction); `accuracy` over all, `img_accuracy` over
predictions whose prompt has `<image>` (percent). Without --base-dir the answer
letter comes from the question file's gpt turn and the choices from "(A) ..." in the
question, over the predicted questions.
"""

from __future__ import annotations

import os
import re

from eval.benchmarks.common import SINGLE_LETTER, Item, answer_id, keyed, media_path, read_json, unique_ids

KIND = "generate"
ID_FIELD = "question_id"
GENERATION = dict(temperature=0.0, max_new_tokens=1024)
FILES = {"question_file": ("file", "run"), "image_folder": ("dir", ""), "base_dir": ("dir", "")}
OPTIONS = ["A", "B", "C", "D", "E"]


def add_arguments(parser) -> None:
  parser.add_argument("--question-file", help="llava_test_CQM-A.json")
  parser.add_argument("--image-folder", help="ScienceQA images/test")
  parser.add_argument("--base-dir", help="folder with problems.json and pid_splits.json")
  parser.add_argument("--split", default="test")


def load(args) -> list[Item]:
  qs = read_json(args.question_file, "--question-file")
  if not isinstance(qs, list) or not all(isinstance(q, dict) for q in qs):
    raise ValueError(f"{args.question_file}: expected a JSON list of question objects")
  items = []
  for q, iid in zip(qs, unique_ids(q.get("id") for q in qs)):
    text = q["conversations"][0]["value"].replace("<image>", "").strip() + "\n" + SINGLE_LETTER
    if "image" in q:
      if not args.image_folder:
        raise ValueError(f"{args.question_file}: question {iid} has an image; --image-folder is required")
      media, kind = media_path(args.image_folder, q["image"], f"{args.question_file}: question {iid}"), "image"
    else:
      media, kind = None, "none"
    items.append(Item(iid, text, text, media, kind, {"id": q["id"]}))
  return items


def record(item: Item, pred: str, model_id: str = "llamavid-jax") -> dict:
  prompt = ("<image>\n" if item.kind == "image" else "") + item.prompt
  rec = {"question_id": item.meta["id"], "prompt": prompt, "text": pred, "answer_id": answer_id(),
         "model_id": model_id, "metadata": {}}
  return keyed(rec, item, item.meta["id"])


def parse(text: str) -> str:
  """The release's option-letter parsing: a letter, or "FAILED"."""
  if text in OPTIONS:
    return text
  if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
    return text[0]
  found = re.findall(r"The answer is ([A-Z]).", text)
  return found[0] if len(found) == 1 else "FAILED"


def _problems(args) -> dict[str, tuple[int, int]]:
  """problem id -> (answer index, number of choices) for the split."""
  if getattr(args, "base_dir", None):
    problems = read_json(os.path.join(args.base_dir, "problems.json"))
    split = read_json(os.path.join(args.base_dir, "pid_splits.json"))[args.split]
    return {pid: (problems[pid]["answer"], len(problems[pid]["choices"])) for pid in split}
  out = {}
  for q in read_json(args.question_file) if getattr(args, "question_file", None) else []:
    human, gpt = q["conversations"][0]["value"], q["conversations"][1]["value"]
    letter = parse(gpt)
    if letter in OPTIONS:
      out[str(q["id"])] = (OPTIONS.index(letter), len(re.findall(r"\(([A-E])\) ", human)))
  return out


def score(records: list[dict], args) -> dict:
  truth = _problems(args)
  if not truth:
    return {"count": len(records), "note": "needs --base-dir (problems.json) or --question-file with answers"}
  preds = {str(r["question_id"]): r for r in records}
  full = bool(getattr(args, "base_dir", None))
  correct = total = img_correct = img_total = 0
  for pid, (answer, n_choices) in truth.items():
    r = preds.get(pid)
    if r is None and not full:
      continue
    letter = parse(r["text"]) if r is not None else "FAILED"
    idx = OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1
    ok = idx == answer
    is_img = r is not None and "<image>" in r.get("prompt", "")
    total += 1
    correct += ok
    img_total += is_img
    img_correct += ok and is_img
  pct = lambda a, b: 100.0 * a / b if b else 0.0   # noqa: E731
  return {"accuracy": pct(correct, total), "img_accuracy": pct(img_correct, img_total), "correct": correct,
          "count": total, "img_correct": img_correct, "img_count": img_total,
          "missing": sum(pid not in preds for pid in truth)}
