"""eval.judge against a fake OpenAI-compatible server on 127.0.0.1 (stdlib http.server)."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval import judge


class FakeJudge:
  """POST /v1/chat/completions -> the OpenAI JSON shape. `replies` maps a prediction (read from
  the user message) to a reply, or to a list of replies given in turn; `fail_first` requests
  answer with `fail_status`. Requests and their bodies are counted."""

  def __init__(self, replies, fail_first=0, fail_status=500):
    self.replies = {k: list(v) if isinstance(v, list) else [v] for k, v in replies.items()}
    self.fail_first, self.fail_status = fail_first, fail_status
    self.requests, self.bodies, self.lock = 0, [], threading.Lock()
    outer = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *a):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with outer.lock:
          outer.requests += 1
          outer.bodies.append(body)
          fail = outer.requests <= outer.fail_first
          if not fail:
            pred = re.search(r"Predicted Answer: (.*)\n", body["messages"][1]["content"]).group(1)
            queue = outer.replies[pred]
            content = queue.pop(0) if len(queue) > 1 else queue[0]
        if self.path != "/v1/chat/completions":
          return self._send(404, {"error": {"message": "not found"}})
        if fail:
          return self._send(outer.fail_status, {"error": {"message": "boom", "type": "server_error"}})
        self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

      def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()
    self.thread.join(timeout=5)


# 4 items, 3 yes: scores 5, 4, 1, 0 -> accuracy 3/4 = 0.75, average (5+4+1+0)/4 = 2.5
REPLIES = {"a cat": "{'pred': 'yes', 'score': 5}", "dog": "{'pred': 'Yes', 'score': 4.8}",
           "maybe a car": " {'pred': 'yes', 'score': 1}\n", "red": "{'pred': 'no', 'score': 0}"}
PREDS = [("v1", "What is it?", "cat", "a cat"), ("v1", "Which animal?", "dog", "dog"),
         ("v2", "What moves?", "car", "maybe a car"), ("v3", "What colour?", "blue", "red")]


def write_preds(path, rows):
  path.write_text("".join(json.dumps(dict(id=i, question=q, answer=a, pred=p)) + "\n" for i, q, a, p in rows))
  return str(path)


def run(tmp_path, server, rows=PREDS, *extra, **kw):
  pred = write_preds(tmp_path / "pred.jsonl", rows)
  out = tmp_path / "summary.json"
  argv = ["--pred", pred, "--out", str(out), "--api-base", server.url, "--api-key", "k", "--backoff", "0.01",
          "--timeout", "5", *extra]
  summary = judge.main(argv)
  assert json.loads(out.read_text()) == summary
  return summary


def test_aggregation_hand_computed(tmp_path):
  with FakeJudge(REPLIES) as s:
    r = run(tmp_path, s, PREDS, "--cache", "")
  assert (r["accuracy"], r["average_score"], r["yes"], r["no"]) == (0.75, 2.5, 3, 1)
  assert (r["count"], r["judged"], r["cached"], r["malformed"], r["http_retries"]) == (4, 4, 0, 0, 0)
  assert s.requests == 4
  body = s.bodies[0]
  assert body["model"] == "gpt-3.5-turbo" and "temperature" not in body   # as the release
  assert [m["role"] for m in body["messages"]] == ["system", "user"]
  assert body["messages"][0]["content"] == judge.SYSTEM["qa"]


def test_video_chatgpt_task_average_only(tmp_path):
  replies = {"a cat": "{'score': 3}", "dog": "{''score': 4}"}   # the second as the prompt's example: not Python
  with FakeJudge(replies) as s:
    r = run(tmp_path, s, PREDS[:2], "--task", "correctness", "--max-retries", "1", "--cache", "")
  assert r["average_score"] == 3.0 and "accuracy" not in r and "yes" not in r
  assert r["malformed_ids"] == ["v1#1"] and s.requests == 1 + 2
  assert s.bodies[0]["messages"][0]["content"] == judge.SYSTEM["correctness"]


def test_retry_after_http_500(tmp_path):
  with FakeJudge(REPLIES, fail_first=1) as s:
    r = run(tmp_path, s, PREDS, "--workers", "1", "--cache", "")
  assert r["http_retries"] == 1 and s.requests == 5
  assert (r["accuracy"], r["average_score"]) == (0.75, 2.5)


def test_http_401_stops_the_run(tmp_path):
  with FakeJudge(REPLIES, fail_first=99, fail_status=401) as s, pytest.raises(SystemExit, match="HTTP 401"):
    run(tmp_path, s, PREDS[:1], "--cache", "")
  assert s.requests == 1


def test_endpoint_down_gives_up_after_retries(tmp_path):
  with FakeJudge(REPLIES) as s:
    pass                                                                      # stopped: its port refuses
  with pytest.raises(SystemExit, match="failed 3 times in a row"):
    run(tmp_path, s, PREDS[:1], "--max-retries", "2", "--cache", "")


def test_malformed_reply_retried_and_counted(tmp_path):
  replies = {**REPLIES, "dog": ["Sure! {'pred': 'yes', 'score': 4}", "{'pred': 'yes', 'score': 4}"],
             "maybe a car": "I think yes, 1"}
  with FakeJudge(replies) as s:
    r = run(tmp_path, s, PREDS, "--max-retries", "2", "--cache", "")
  assert r["malformed"] == 1 and r["malformed_ids"] == ["v2"]
  assert r["malformed_replies"] == 1 + 3 and s.requests == 4 + 1 + 2
  assert (r["yes"], r["no"], r["count"]) == (2, 1, 3)                        # v2 left out
  assert r["accuracy"] == 2 / 3 and r["average_score"] == (5 + 4 + 0) / 3


def test_resume_from_cache(tmp_path):
  cache = str(tmp_path / "cache.jsonl")
  with FakeJudge(REPLIES) as s:
    r1 = run(tmp_path, s, PREDS[:2], "--cache", cache)                        # an interrupted run: 2 of 4
    with open(cache, "a") as f:
      f.write('{"key": "[\\"v2\\", ')                                         # a torn last line
    r2 = run(tmp_path, s, PREDS, "--cache", cache)
    assert s.requests == 4 and (r1["judged"], r2["judged"], r2["cached"]) == (2, 2, 2)
    r3 = run(tmp_path, s, PREDS, "--cache", cache)
    assert s.requests == 4                                                    # nothing asked again
    r4 = run(tmp_path, s, PREDS, "--cache", cache, "--judge-model", "gpt-4")   # another judge: asked
  assert (r3["cached"], r3["judged"], r3["accuracy"], r3["average_score"]) == (4, 0, 0.75, 2.5)
  assert r4["cached"] == 0 and s.requests == 8


def test_no_endpoint_reports_exact_match(tmp_path, monkeypatch, capsys):
  for k in ("OPENAI_API_BASE", "OPENAI_BASE_URL"):
    monkeypatch.delenv(k, raising=False)
  rows = [("a", "q", "cat", "cat"), ("b", "q", "The dog", "dog."), ("c", "q", "car", "a red car"),
          ("d", "q", "x", " x ")]                                              # exact: a, d; normalised: + b
  pred = write_preds(tmp_path / "pred.jsonl", rows)
  r = judge.main(["--pred", pred, "--out", str(tmp_path / "s.json")])
  assert "no judge endpoint" in capsys.readouterr().err
  assert r["judge_model"] is None and r["count"] == 4
  assert r["exact_match"] == 0.5 and r["normalized_match"] == 0.75


def test_bad_prediction_line_names_file_and_line(tmp_path):
  p = tmp_path / "pred.jsonl"
  p.write_text('{"id": 1, "question": "q", "answer": "a", "pred": "a"}\n\n{"id": 2, "question": "q"}\n')
  with pytest.raises(SystemExit, match=rf"{re.escape(str(p))}:3: missing 'answer'"):
    judge.main(["--pred", str(p), "--out", str(tmp_path / "s.json")])
  p.write_text("not json\n")
  with pytest.raises(SystemExit, match=":1: not JSON"):
    judge.main(["--pred", str(p), "--out", str(tmp_path / "s.json")])


def test_parse_verdict_as_the_release():
  assert judge.parse_verdict("{'pred': 'yes', 'score': 4.8}", "qa") == {"pred": "yes", "score": 4}
  assert judge.parse_verdict("{'predicted': 'No.', 'score': '2'}", "qa") == {"pred": "no", "score": 2}
  for bad in ("yes, 4", "{'pred': 'maybe', 'score': 3}", "{'pred': 'yes', 'score': 7}", "{'pred': 'yes'}",
              "{'pred': 'yes', 'score': True}", "[1]", "", None):
    assert judge.parse_verdict(bad, "qa") is None, bad
  assert judge.parse_verdict("{'score': 3}", "temporal") == {"score": 3}


def test_consistency_prompt_and_release_names(tmp_path):
  p = tmp_path / "pred.jsonl"
  p.write_text(json.dumps(dict(video_name="v", Q1="first?", Q2="second?", A="a", pred1="x", pred2="y")) + "\n")
  (item,) = judge.load_predictions(str(p), "consistency")
  user = judge.build_messages("consistency", item)[1]["content"]
  assert "Question 1: first?\nQuestion 2: first?\n" in user              # the release sends Q1 twice
  assert "Question 2: second?\n" in judge.build_messages("consistency", item, consistency_q2=True)[1]["content"]
  assert judge.match_summary([item], "consistency")["count"] == 2
