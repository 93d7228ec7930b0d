"""GPT-judged video-QA scoring with the release's judge prompts.

  python -m eval.judge --pred PRED.jsonl --out SUMMARY.json \
      [--task qa|correctness|detail|context|temporal|consistency] \
      [--api-base URL] [--api-key KEY] [--judge-model gpt-3.5-turbo] [--cache CACHE.jsonl] \
      [--workers 4] [--max-retries 5] [--backoff 1.0] [--timeout 60] [--deadline S] [--temperature T]

PRED.jsonl holds one prediction a line: `{id, question, answer, pred}` (task `qa`: MSVD /
MSRVTT / ActivityNet-QA, `llamavid/eval/eval_{msvd,activitynet}_qa.py`; and the Video-ChatGPT
benchmark's `correctness`, `detail`, `context`, `temporal`, `evaluate_benchmark_{1..4}_*.py`),
or `{id, question1, question2, answer, pred1, pred2}` (`consistency`,
`evaluate_benchmark_5_consistency.py`). The release's own names are read too: `video_name`
for `id`, `Q`/`A`/`Q1`/`Q2`.

Each item is sent to an OpenAI-compatible chat endpoint (`--api-base`, else $OPENAI_API_BASE
or $OPENAI_BASE_URL; key `--api-key`, else $OPENAI_API_KEY) with the release's system and user
messages, word for word. The judge answers with a Python-dict string, "{'pred': 'yes',
'score': 4}" (`qa`) or "{'score': 3}" (the others), read as the release reads it
(`parse_verdict`). HTTP 429 / 408 / 409 / 5xx and connection errors are retried with
exponential backoff (`--backoff` seconds, doubling); other HTTP errors stop the run. A reply
that does not parse (a 200 whose body is not JSON included) is asked again; failed requests
and malformed replies share one budget of `--max-retries` + 1 requests per item, after
which the item is counted `malformed`, left out of the metrics and named in the summary.
`--deadline` bounds the whole run (each request's timeout is cut to what is left). `--out`
may not be `--pred` or the cache (the summary goes beside the predictions).

Verdicts are appended (and flushed) to the cache, JSON lines keyed by item id, task, judge
model and a digest of the prompt (default `SUMMARY.json.cache.jsonl`), so that a rerun asks
only for what is missing (malformed items included). The summary, written to `--out` and
printed:

  {task, judge_model, accuracy, average_score, yes, no, count, malformed, malformed_ids,
   judged, cached, malformed_replies, http_retries, seconds}

as the release computes it: accuracy = yes / (yes + no), average_score = mean score over the
judged items (`count`: judged this run + `cached`); the Video-ChatGPT tasks have no yes / no
and no accuracy. With no endpoint it says so on stderr and reports the exact-match and
normalised-match accuracy of the predictions instead.

The release's consistency script fills its "Question 2" slot with Q1 (`question2 =
sample['Q1']`, as Video-ChatGPT's own script), so published consistency scores were judged
that way; this is the default here for comparable numbers, `--consistency-q2` sends Q2.
The release leaves the temperature at the endpoint's default; `--temperature 0` sets one.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from eval.benchmarks import video_chatgpt, video_qa
from llamavid_jax import cli, validation

log = logging.getLogger("eval.judge")

TASKS = ("qa", "correctness", "detail", "context", "temporal", "consistency")
RETRY_STATUS = (408, 409, 429)   # and every 5xx

# --- the release's prompts, kept beside their benchmarks (eval/benchmarks/video_qa.py: "qa";
# video_chatgpt.py: the other five tasks) ------------------------------------------------
_HEAD = video_chatgpt.JUDGE_HEAD   # the same first line for every task
SYSTEM = {**video_qa.JUDGE_SYSTEM, **video_chatgpt.JUDGE_SYSTEM}
INSTRUCTION = {**video_qa.JUDGE_INSTRUCTION, **video_chatgpt.JUDGE_INSTRUCTION}

FIELDS = {"qa": ("question", "answer", "pred"), "consistency": ("question1", "question2", "answer", "pred1", "pred2")}
ALIASES = {"id": "video_name", "question": "Q", "answer": "A", "question1": "Q1", "question2": "Q2"}


def build_messages(task: str, item: dict, consistency_q2: bool = False) -> list[dict]:
  """The release's [system, user] chat messages for one prediction item."""
  if task == "consistency":
    q2 = item["question2"] if consistency_q2 else item["question1"]   # the release sends Q1 twice
    fields = (f"Question 1: {item['question1']}\n"
              f"Question 2: {q2}\n"
              f"Correct Answer: {item['answer']}\n"
              f"Predicted Answer to Question 1: {item['pred1']}\n"
              f"Predicted Answer to Question 2: {item['pred2']}\n\n")
  else:
    fields = (f"Question: {item['question']}\n"
              f"Correct Answer: {item['answer']}\n"
              f"Predicted Answer: {item['pred']}\n\n")
  return [{"role": "system", "content": SYSTEM[task]},
          {"role": "user", "content": _HEAD + fields + INSTRUCTION[task]}]


def load_predictions(path: str, task: str) -> list[dict]:
  """JSON lines -> items with a unique `uid` (a repeated id gets `#1`, `#2`, ... as the release's
  `_{n}` keys). A line that is not an object with the task's fields raises ValueError naming
  the file and line."""
  need = ("id",) + FIELDS.get(task, FIELDS["qa"])
  items, seen = [], {}
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
      item = {}
      for k in need:
        if k in row or ALIASES.get(k) in row:
          item[k] = row[k] if k in row else row[ALIASES[k]]
        else:
          raise ValueError(f"{path}:{lineno}: missing '{k}' (task {task} needs {', '.join(need)})")
      n = seen[str(item["id"])] = seen.get(str(item["id"]), -1) + 1
      item["uid"] = str(item["id"]) if n == 0 else f"{item['id']}#{n}"
      items.append(item)
  return items


def parse_verdict(reply: str | None, task: str) -> dict | None:
  """A judge reply -> {"score": int 0..5[, "pred": "yes"|"no"]}, None when malformed.

  Read as the release reads it: `ast.literal_eval` into a dict, score = int(value) (so a
  4.8 is 4), pred "yes" if "yes" is in it, else "no" if "no" is in it, case-insensitively
  (the release also takes a 'predicted' key)."""
  try:
    d = ast.literal_eval((reply or "").strip())
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return None
  if not isinstance(d, dict) or isinstance(d.get("score"), bool):
    return None
  try:
    score = int(d.get("score"))
  except (TypeError, ValueError, OverflowError):
    return None
  if not 0 <= score <= 5:
    return None
  if task != "qa":
    return {"score": score}
  pred = d.get("pred", d.get("predicted"))
  if not isinstance(pred, str):
    return None
  low = pred.lower()
  pred = "yes" if "yes" in low else "no" if "no" in low else None
  return {"pred": pred, "score": score} if pred else None


def aggregate(verdicts: list[dict], task: str) -> dict:
  """The release's final numbers: average_score over all verdicts, accuracy = yes / (yes + no).
  (Checked, outside the tests, against the closing loop of eval_msvd_qa.py and
  eval_activitynet_qa.py run on the same replies as its [response_dict, qa_set] files: equal
  accuracy and average score, 0.75 / 2.5 on the tests' four, 0.403 / 2.295 on 1000 random ones
  with float scores and 'Yes.' / 'NO' / 'no, it is not' preds; and the benchmark scripts'
  average score, 2.755 on 1000 random scores.)"""
  n = len(verdicts)
  out = {"average_score": sum(v["score"] for v in verdicts) / n if n else None}
  if task == "qa":
    yes = sum(v["pred"] == "yes" for v in verdicts)
    no = n - yes
    out.update(accuracy=yes / (yes + no) if n else None, yes=yes, no=no)
  return out


# --- string matches (no judge) --------------------------------------------------------------
def match_summary(items: list[dict], task: str) -> dict:
  """The video-QA benchmarks' string-match accuracies (`eval.benchmarks.video_qa.score`:
  exact, normalised, contains; fractions here), consistency: both predictions against
  the answer."""
  from eval.benchmarks import video_qa
  keys = ("pred1", "pred2") if task == "consistency" else ("pred",)
  s = video_qa.score([{"pred": it[k], "answer": it["answer"]} for it in items for k in keys])
  n = s["count"]
  frac = lambda k: s["correct"][k] / n if n else None   # noqa: E731
  return {"task": task, "judge_model": None, "count": n, "exact_match": frac("exact"),
          "normalized_match": frac("normalized"), "contains_match": frac("contains")}


# --- the judge -----------------------------------------------------------------------------
class JudgeError(RuntimeError):
  """The endpoint refused a request or kept failing; verdicts so far are in the cache."""


class Judge:
  """An OpenAI-compatible chat endpoint; `ask(messages)` -> (reply text, HTTP retries)."""

  def __init__(self, api_base: str, api_key: str | None, model: str = "gpt-3.5-turbo", *,
               temperature: float | None = None, timeout: float = 60.0, max_retries: int = 5,
               backoff: float = 1.0, deadline: float | None = None):
    if max_retries < 0 or not timeout > 0 or backoff < 0 or (deadline is not None and not deadline > 0):
      raise ValueError(f"max_retries must be >= 0, timeout and deadline > 0, backoff >= 0; got {max_retries}, "
                       f"{timeout}, {deadline}, {backoff}")
    try:
      import openai   # lazily: the package imports without the `judge` extra
    except ImportError as e:
      raise JudgeError("the judge needs the openai client: pip install 'llamavid-jax[judge]'") from e
    self._openai = openai
    self.client = openai.OpenAI(base_url=api_base, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout)
    self.model, self.temperature, self.timeout = model, temperature, timeout
    self.max_retries, self.backoff = max_retries, backoff
    self.deadline = None if deadline is None else time.monotonic() + deadline   # one for the whole run
    self.deadline_s = deadline

  def _left(self) -> float:
    """Seconds to the overall deadline (inf without one); JudgeError once it has passed."""
    if self.deadline is None:
      return float("inf")
    left = self.deadline - time.monotonic()
    if left <= 0:
      raise JudgeError(f"the overall --deadline of {self.deadline_s:g} s has passed")
    return left

  def ask(self, messages: list[dict], tries: int | None = None) -> tuple[str | None, int]:
    """-> (reply text, HTTP retries); a reply that is not a chat completion (a 200 whose
    body is not JSON, or has no message) is None: malformed, asked again by `verdict`.
    At most `tries` requests (default max_retries + 1)."""
    kw = {} if self.temperature is None else {"temperature": self.temperature}
    tries = self.max_retries + 1 if tries is None else tries
    err = None
    for attempt in range(tries):
      left = self._left()
      try:
        r = self.client.chat.completions.create(model=self.model, messages=messages,
                                                timeout=min(self.timeout, left), **kw)
        return ((r.choices[0].message.content or "") if r.choices else ""), attempt
      except self._openai.APIStatusError as e:
        if e.status_code < 500 and e.status_code not in RETRY_STATUS:
          raise JudgeError(f"judge endpoint refused the request: HTTP {e.status_code}: {e.message}") from e
        err = e
      except self._openai.APIConnectionError as e:   # timeouts included
        err = e
      except (ValueError, AttributeError, TypeError, IndexError, self._openai.APIResponseValidationError):
        return None, attempt   # a 200 that is not JSON / not a completion: a malformed reply
      if attempt < tries - 1:
        time.sleep(min(self.backoff * 2 ** attempt, self._left()))
    raise JudgeError(f"judge endpoint failed {tries} times in a row; last error: {err}")

  def verdict(self, messages: list[dict], task: str) -> tuple[dict | None, str, int, int]:
    """-> (verdict or None, last reply, malformed replies, HTTP retries). Failed requests
    and malformed replies share one budget of max_retries + 1 requests per item (one wave
    of retries, not a wave of HTTP retries per malformed reply)."""
    malformed = retries = used = 0
    reply = None
    while used <= self.max_retries:
      reply, r = self.ask(messages, tries=self.max_retries + 1 - used)
      retries, used = retries + r, used + r + 1
      v = parse_verdict(reply, task)
      if v is not None:
        return v, reply, malformed, retries
      malformed += 1
    return None, reply or "", malformed, retries


def _cache_key(uid: str, task: str, model: str, messages: list[dict]) -> str:
  digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
  return json.dumps([uid, task, model, digest])


def load_cache(path: str | None) -> dict[str, dict]:
  """Cache lines -> {key: verdict}; a torn last line (an interrupted write) is skipped."""
  out = {}
  if path and os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
          out[row["key"]] = row["verdict"]
        except (json.JSONDecodeError, KeyError, TypeError):
          continue
  return out


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def run_judge(items: list[dict], task: str, judge: Judge, *, cache: str | None = None, workers: int = 4,
              consistency_q2: bool = False) -> dict:
  """Judge every item not in the cache (appending each verdict as it comes) -> the summary."""
  t0 = time.time()
  known = load_cache(cache)
  verdicts, todo = {}, []
  for it in items:
    msgs = build_messages(task, it, consistency_q2)
    key = _cache_key(it["uid"], task, judge.model, msgs)
    if key in known:
      verdicts[it["uid"]] = known[key]
    else:
      todo.append((it, key, msgs))
  n_cached = len(verdicts)
  malformed, n_malformed, n_retries = set(), 0, 0
  log.info("%d items: %d cached, %d to judge with %s", len(items), n_cached, len(todo), judge.model)
  f = open(cache, "a") if cache else None
  if f and f.tell() and not _ends_with_newline(cache):
    f.write("\n")   # after a torn last line
  try:
    with ThreadPoolExecutor(max(1, workers)) as ex:
      futs = {ex.submit(judge.verdict, msgs, task): (it, key) for it, key, msgs in todo}
      try:
        for i, fut in enumerate(as_completed(futs), 1):
          it, key = futs[fut]
          v, reply, m, r = fut.result()
          n_malformed, n_retries = n_malformed + m, n_retries + r
          if v is None:
            malformed.add(it["uid"])
            log.warning("%s: malformed judge reply %d times, last %r", it["uid"], m, reply[:200])
          else:
            verdicts[it["uid"]] = v
            if f:
              f.write(json.dumps({"key": key, "id": it["uid"], "verdict": v, "reply": reply}) + "\n")
              f.flush()
          if i % max(1, len(todo) // 10) == 0:
            log.info("judged %d / %d", i, len(todo))
      except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
  finally:
    if f:
      f.close()
  done = [verdicts[it["uid"]] for it in items if it["uid"] in verdicts]
  return {"task": task, "judge_model": judge.model, **aggregate(done, task), "count": len(done),
          "malformed": len(malformed), "malformed_ids": [it["uid"] for it in items if it["uid"] in malformed],
          "judged": len(done) - n_cached, "cached": n_cached, "malformed_replies": n_malformed,
          "http_retries": n_retries, "seconds": round(time.time() - t0, 3)}


def main(argv=None) -> dict:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pred", required=True, help="prediction JSON lines")
  p.add_argument("--out", required=True, help="summary JSON")
  p.add_argument("--task", default="qa", choices=TASKS)
  p.add_argument("--api-base", help="OpenAI-compatible base URL (…/v1); default $OPENAI_API_BASE or $OPENAI_BASE_URL")
  p.add_argument("--api-key", help="default $OPENAI_API_KEY (better there than on a command line)")
  p.add_argument("--judge-model", default="gpt-3.5-turbo")
  p.add_argument("--cache", help="verdict cache, JSON lines (default OUT.cache.jsonl; '' for none)")
  p.add_argument("--workers", type=int, default=4, help="requests in flight")
  p.add_argument("--max-retries", type=int, default=5, help="per request (HTTP) and per item (malformed replies)")
  p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubling")
  p.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
  p.add_argument("--deadline", type=float, help="seconds for the whole run (default: none); verdicts so far are kept")
  p.add_argument("--temperature", type=float, help="default: not sent (the endpoint's default), as the release")
  p.add_argument("--consistency-q2", action="store_true",
                 help="send Q2 as 'Question 2' (the release, and so its numbers, sends Q1 twice)")
  a = p.parse_args(argv)
  cache = f"{a.out}.cache.jsonl" if a.cache is None else (a.cache or None)
  errs = [] if os.path.isfile(a.pred) else [f"--pred {a.pred}: no such file"]
  errs += [f"--{k.replace('_', '-')} must be >= 0, got {v}" for k, v in
           (("max_retries", a.max_retries), ("backoff", a.backoff)) if not v >= 0]
  errs += [f"--{k} must be > 0, got {v}" for k, v in (("timeout", a.timeout), ("workers", a.workers),
                                                     ("deadline", a.deadline)) if v is not None and not v > 0]
  errs += [f"--timeout must be finite, got {a.timeout}" for _ in [0] if a.timeout == float("inf")]
  errs += validation.check_sampling(temperature=a.temperature, max_new_tokens=None, prefill_chunk=None)
  errs += validation.check_out(a.out, {"--pred": a.pred, "--cache": cache})
  errs += validation.check_out(cache, {"--pred": a.pred}, "--cache")
  if errs:
    p.error("; ".join(errs))
  cli.log_to_console("%(asctime)s %(name)s: %(message)s")
  try:
    items = load_predictions(a.pred, a.task)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {cli.message(e)}")
  api_base = a.api_base or os.environ.get("OPENAI_API_BASE") or os.environ.get("OPENAI_BASE_URL")
  if not api_base:
    print("eval.judge: no judge endpoint (--api-base, $OPENAI_API_BASE, $OPENAI_BASE_URL); "
          "reporting exact-match metrics only", file=sys.stderr)
    summary = match_summary(items, a.task)
  else:
    try:
      judge = Judge(api_base, a.api_key or os.environ.get("OPENAI_API_KEY"), a.judge_model,
                    temperature=a.temperature, timeout=a.timeout, max_retries=a.max_retries, backoff=a.backoff,
                    deadline=a.deadline)
      summary = run_judge(items, a.task, judge, cache=cache, workers=a.workers, consistency_q2=a.consistency_q2)
    except JudgeError as e:
      kept = f" (verdicts so far are in {cache}; rerun to resume)" if cache and os.path.exists(cache) else ""
      raise SystemExit(f"error: {e}{kept}")
  validation.write_atomic(a.out, json.dumps(summary, indent=2))   # beside the predictions, never over them
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  cli.run(main)
