"""Open-ended video QA: MSVD-QA, MSRVTT-QA, ActivityNet-QA (one module, three names).

Question files, in the release's two layouts:
  combined (MSVD / MSRVTT `test_qa.json`, the release's `--gt_file`): a JSON list of
    {video_id, question, answer, id}; give it as --question-file or --gt-file.
  split (ActivityNet `test_q.json` + `test_a.json`): --question-file lists
    {video_name, question, question_id}, --gt-file lists {answer, type, question_id};
    they are paired by question_id where both files carry it, else by position (the
    release pairs by position only).
Videos: --video-folder/{prefix}{video}{ext}, the first of .mp4 .avi .mov .mkv that
exists; the prefix is "v_" for activitynet_qa (the release's `v_{video_name}`), else
"" (--video-prefix overrides).

Prediction file (the release's `model_*_qa.py` output): JSON lines {id, question,
answer, pred}; `key` is added where an id repeats in the question file.

Metric: the release's is GPT-judged (yes/no + 0-5 score in `eval_*_qa.py`; see
eval.judge). Here, without a judge, percentages of predictions whose text matches the
answer: `exact` (case and surrounding spaces ignored), `normalized` (both sides
lowercased, apostrophes dropped, other punctuation turned into spaces, the articles
a / an / the dropped, spaces collapsed) and `contains` (the normalised answer occurs as
whole words in the normalised prediction).
"""

from __future__ import annotations

import re

from eval.benchmarks.common import Item, check_ids, find_video, keyed, read_json, unique_ids

NAMES = ("msvd_qa", "msrvtt_qa", "activitynet_qa")
VIDEO_PREFIX = {"activitynet_qa": "v_"}
KIND = "generate"
ID_FIELD = "id"
GENERATION = dict(temperature=0.2, max_new_tokens=1024)   # the release: do_sample, 0.2, 1024 tokens
FILES = {"question_file": ("file", ""), "gt_file": ("file", ""), "video_folder": ("dir", "run")}


def add_arguments(parser) -> None:
  parser.add_argument("--question-file", help="test_qa.json (combined) or test_q.json (split layout)")
  parser.add_argument("--gt-file", "--gt", dest="gt_file", help="test_a.json (split layout), or the combined file")
  parser.add_argument("--video-folder", help="folder of the videos")
  parser.add_argument("--video-prefix", default=None, help='before each video name (default "v_" for activitynet_qa)')


def check(args, mode: str) -> list[str]:
  if mode == "run" and not (args.question_file or args.gt_file):
    return ["--question-file (or --gt-file) is required"]
  return []


def _entries(args) -> list[dict]:
  """Question entries with their answers: {video, question, answer, id}."""
  qfile = args.question_file or args.gt_file
  qs = read_json(qfile, "--question-file")
  if not isinstance(qs, list):
    raise ValueError(f"{qfile}: expected a JSON list of questions")
  answers = None
  if args.question_file and args.gt_file and args.gt_file != args.question_file:
    answers = read_json(args.gt_file, "--gt-file")
    if not isinstance(answers, list) or len(answers) != len(qs):
      raise ValueError(f"{args.gt_file}: {len(answers) if isinstance(answers, list) else 'not a list of'} answers "
                       f"for {len(qs)} questions in {args.question_file}")
    if all("question_id" in a for a in answers) and all("question_id" in q for q in qs):
      by_id = {a["question_id"]: a for a in answers}
      missing = [q["question_id"] for q in qs if q["question_id"] not in by_id]
      if missing:
        raise ValueError(f"{args.gt_file}: no answer for question_id {missing[:5]} ({len(missing)} in all)")
      answers = [by_id[q["question_id"]] for q in qs]
  out = []
  for n, q in enumerate(qs):
    if not isinstance(q, dict):
      raise ValueError(f"{qfile}: entry {n} is a {type(q).__name__}, not a JSON object")
    video = q.get("video_id", q.get("video_name"))
    qid = q.get("id", q.get("question_id"))
    if video is None or "question" not in q or qid is None:
      raise ValueError(f"{qfile}: entry {n} lacks video_id/video_name, question or id/question_id")
    if not isinstance(q["question"], str) or isinstance(video, (dict, list, bool, float)):
      raise ValueError(f"{qfile}: entry {n}: 'question' must be a string and the video id a string or integer")
    src, a = (args.gt_file, answers[n]) if answers is not None else (qfile, q)
    if not isinstance(a, dict) or "answer" not in a:   # the metric would count fewer items without a word
      raise ValueError(f"{src}: entry {n} (id {qid!r}) has no 'answer'")
    out.append({"video": str(video), "question": q["question"], "answer": a["answer"], "id": qid})
  check_ids(qfile, [e["id"] for e in out])
  return out


def load(args) -> list[Item]:
  prefix = args.video_prefix if args.video_prefix is not None else VIDEO_PREFIX.get(args.benchmark, "")
  entries = _entries(args)
  return [Item(iid, e["question"], e["question"],
               find_video(args.video_folder, prefix + e["video"], where=f"{args.question_file or args.gt_file}: id {e['id']!r}"),
               "video",
               {"id": e["id"], "question": e["question"], "answer": e["answer"]})
          for e, iid in zip(entries, unique_ids(e["id"] for e in entries))]


def record(item: Item, pred: str, model_id: str = "") -> dict:
  m = item.meta
  return keyed({"id": m["id"], "question": m["question"], "answer": m["answer"], "pred": pred}, item, m["id"])


def normalize(text) -> str:
  t = str(text).lower().replace("'", "").replace("\u2019", "")
  t = "".join(c if c.isalnum() or c.isspace() else " " for c in t)
  return " ".join(w for w in t.split() if w not in ("a", "an", "the"))


def score(records: list[dict], args=None) -> dict:
  n = exact = norm = contains = 0
  for r in records:
    if r.get("answer") is None:
      continue
    n += 1
    pred, ans = str(r.get("pred", "")), str(r["answer"])
    exact += pred.strip().lower() == ans.strip().lower()
    p, a = normalize(pred), normalize(ans)
    norm += p == a
    contains += bool(a) and re.search(rf"(^| ){re.escape(a)}( |$)", p) is not None
  pct = lambda k: 100.0 * k / n if n else 0.0   # noqa: E731
  return {"count": n, "exact": pct(exact), "normalized": pct(norm), "contains": pct(contains),
          "correct": {"exact": exact, "normalized": norm, "contains": contains},
          "note": "the release's metric is GPT-judged (eval.judge); these are string matches"}


# --- the GPT judge's prompts (eval.judge, task "qa"): the release's eval_msvd_qa.py /
# eval_activitynet_qa.py, word for word ----------------------------------------------------
JUDGE_SYSTEM = {
  "qa":
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer.",
}

JUDGE_INSTRUCTION = {   # the user message after the item's fields
  "qa":
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}.",
}
