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


# --- the GPT judge's prompts (eval.judge, its five Video-ChatGPT tasks): the release's
# evaluate_benchmark_{1..5}_*.py, word for word ------------------------------------------
JUDGE_HEAD = "Please evaluate the following video-based question-answer pair:\n\n"
_TAIL = ("DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
         "For example, your response should look like this: {''score': 4.8}.")

JUDGE_SYSTEM = {
  "correctness":
    "You are an intelligent chatbot designed for evaluating the factual accuracy of generative outputs for video-based question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they are factually consistent. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the factual consistency between the predicted answer and the correct answer. The predicted answer should not contain any misinterpretations or misinformation.\n"
    "- The predicted answer must be factually accurate and align with the video content.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the factual accuracy of the prediction compared to the answer.",
  "detail":
    "You are an intelligent chatbot designed for evaluating the detail orientation of generative outputs for video-based question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine its level of detail, considering both completeness and specificity. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Check if the predicted answer covers all major points from the video. The response should not leave out any key aspects.\n"
    "- Evaluate whether the predicted answer includes specific details rather than just generic points. It should provide comprehensive information that is tied to specific elements of the video.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Provide a single evaluation score that reflects the level of detail orientation of the prediction, considering both completeness and specificity.",
  "context":
    "You are an intelligent chatbot designed for evaluating the contextual understanding of generative outputs for video-based question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if the generated response aligns with the overall context of the video content. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Evaluate whether the predicted answer aligns with the overall context of the video content. It should not provide information that is out of context or misaligned.\n"
    "- The predicted answer must capture the main themes and sentiments of the video.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Provide your evaluation of the contextual understanding of the prediction compared to the answer.",
  "temporal":
    "You are an intelligent chatbot designed for evaluating the temporal understanding of generative outputs for video-based question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they correctly reflect the temporal sequence of events in the video content. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the temporal consistency between the predicted answer and the correct answer. The predicted answer should correctly reflect the sequence of events or details as they are presented in the video content.\n"
    "- Consider synonyms or paraphrases as valid matches, but only if the temporal order is maintained.\n"
    "- Evaluate the temporal accuracy of the prediction compared to the answer.",
  "consistency":
    "You are an intelligent chatbot designed for evaluating the consistency of generative outputs for similar video-based question-answer pairs. "
    "You will be given two very similar questions, a common answer common to both the questions and predicted answers for the two questions ."
    "Your task is to compare the predicted answers for two very similar question, with a common correct answer and determine if they are consistent. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the consistency between the two predicted answers and the correct answer. Both predicted answers should correspond to the correct answer and to each other, and should not contain any contradictions or significant differences in the conveyed information.\n"
    "- Both predicted answers must be consistent with each other and the correct answer, in terms of the information they provide about the video content.\n"
    "- Consider synonyms or paraphrases as valid matches, but only if they maintain the consistency in the conveyed information.\n"
    "- Evaluate the consistency of the two predicted answers compared to the correct answer.",
}

JUDGE_INSTRUCTION = {   # the user message after the item's fields
  "correctness":
    "Provide your evaluation only as a factual accuracy score where the factual accuracy score is an integer value between 0 and 5, with 5 indicating the highest level of factual consistency. "
    "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is the factual accuracy score in INTEGER, not STRING." + _TAIL,
  "detail":
    "Provide your evaluation only as a detail orientation score where the detail orientation score is an integer value between 0 and 5, with 5 indicating the highest level of detail orientation. "
    "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is the detail orientation score in INTEGER, not STRING." + _TAIL,
  "context":
    "Provide your evaluation only as a contextual understanding score where the contextual understanding score is an integer value between 0 and 5, with 5 indicating the highest level of contextual understanding. "
    "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is contextual understanding score in INTEGER, not STRING." + _TAIL,
  "temporal":
    "Provide your evaluation only as a temporal accuracy score where the temporal accuracy score is an integer value between 0 and 5, with 5 indicating the highest level of temporal consistency. "
    "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is the temporal accuracy score in INTEGER, not STRING." + _TAIL,
  "consistency":
    "Provide your evaluation only as a consistency score where the consistency score is an integer value between 0 and 5, with 5 indicating the highest level of consistency. "
    "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is the consistency score in INTEGER, not STRING." + _TAIL,
}
