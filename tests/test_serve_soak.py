"""A bounded soak of `eval.serve`, run as users run it (`python -m eval.serve` in its own
process, on 127.0.0.1, an ephemeral port): SOAK requests from CLIENTS threads of the real
`openai` client, streaming and not, some of them disconnecting after their first chunk.
Every request that completes has its one-at-a-time greedy tokens
(`inference.Model.generate`, in this process), the server's /metrics come back to 0 slots
in use and an empty queue, its finish counts add up, and the server's resident memory
(/proc/PID/status) after the soak is within 10% of its memory after a warm-up round.

The server has a process of its own: in the full suite, a server thread inside a pytest
worker that had run many other test files before it segfaulted in XLA:CPU (a prefill
compile on the engine thread, 3 of 4 CI runs on 2026-12-07); alone it passes. A crash of
the server now fails this test with the server's output instead of taking the worker down."""

import concurrent.futures
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from llamavid_jax import inference
from tests import data_fixtures

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.slow

MODEL = "tiny"
SOAK, CLIENTS, WARMUP = 512, 32, 48
DROP_EVERY = 16   # every 16th request reads one chunk and disconnects
NEW = 16
# Questions of the data fixtures' tokenizer, each with a budget; text only or with an image
CASES = [("Hello What is this?", 12), ("Describe it.", 5), ("What is this?", 9)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
  """`python -m eval.serve` on an ephemeral port: `url`, `pid`, `metrics()`, `stop()`."""

  def __init__(self, ckpt: str, media_root: str, log_path: str, start_limit: float = 300.0):
    self.log_path = log_path
    self.log = open(log_path, "w")
    cmd = [sys.executable, "-m", "eval.serve", "--ckpt", ckpt, "--port", "0", "--slots", "8", "--max-positions", "128",
           "--decode-chunk", "4", "--max-queue", "64", "--max-tokens", "64", "--media-root", media_root,
           "--served-model-name", MODEL]
    # as a user runs it: without the suite's persistent compilation cache
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                 env={**env, "PYTHONPATH": ROOT})
    self.pid, self.url = self.proc.pid, None
    deadline = time.monotonic() + start_limit   # a bound on the wait, not a timing assertion
    while not self._healthy():
      if self.proc.poll() is not None or time.monotonic() > deadline:
        self.stop()
        pytest.fail(f"eval.serve did not start:\n{self.output()}")
      time.sleep(0.2)

  def _healthy(self) -> bool:
    """Whether the server said where it serves and answers /health there."""
    if self.url is None:
      m = re.search(r"serving '[^']*' on (http://\S+)/v1", self.output())
      self.url = m and m.group(1)
    try:   # the socket is bound before uvicorn listens on it
      return self.url is not None and httpx.get(self.url + "/health").status_code == 200
    except httpx.TransportError:
      return False

  def output(self) -> str:
    return open(self.log_path).read()[-6000:]

  def metrics(self) -> dict:
    """/metrics -> {name{labels}: value}."""
    text = httpx.get(self.url + "/metrics").text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}

  def rss_kib(self) -> int:
    with open(f"/proc/{self.pid}/status") as f:
      return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()


@pytest.fixture(scope="module")
def soak_server(tiny_ckpt, tmp_path_factory):
  root = tmp_path_factory.mktemp("soak_media")
  data_fixtures.random_image(np.random.default_rng(1), 20, 12).save(root / "image.png")
  server = Server(tiny_ckpt, str(root), str(root.parent / "soak_server.log"))
  try:
    yield inference.load(tiny_ckpt), server, str(root)
  finally:
    server.stop()


def _requests(m, root):
  """(messages, budget, reference ids) of the soak's kinds of request."""
  out = []
  image = {"type": "image_url", "image_url": {"url": f"file://{root}/image.png"}}
  for q, budget in CASES:
    for media in (None, m.media(image=f"{root}/image.png")):
      [ans] = m.generate([m.request([q], media)], max_new_tokens=NEW)
      content = q if media is None else [image, {"type": "text", "text": q}]
      out.append(([{"role": "user", "content": content}], budget, ans.token_ids[:budget]))
  return out


def _one(client, m, kinds, i):
  """Request i -> ("ok" | "dropped", whether it had its reference tokens)."""
  msgs, budget, want = kinds[i % len(kinds)]
  kw = dict(model=MODEL, messages=msgs, temperature=0, max_tokens=budget, extra_body={"return_token_ids": True})
  if i % DROP_EVERY == DROP_EVERY - 1:   # a client that goes away mid-stream
    stream = client.chat.completions.create(**{**kw, "max_tokens": 48}, stream=True)
    next(iter(stream))
    stream.close()
    return "dropped", True
  if i % 2:
    text, ids = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
      if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        ids = (chunk.choices[0].model_extra or {}).get("token_ids", ids)
    return "ok", ids == want and text == m.answer(want).text
  r = client.chat.completions.create(**kw)
  return "ok", r.choices[0].model_extra["token_ids"] == want and r.choices[0].message.content == m.answer(want).text


def _finished(metrics: dict) -> dict:
  return {k.split('"')[1]: int(v) for k, v in metrics.items() if k.startswith("llamavid_requests_finished_total{")}


def _idle(server, limit=60.0) -> dict:
  """Waits until the server's engine has no request -> its /metrics."""
  deadline = time.monotonic() + limit   # a bound on the wait, not a timing assertion
  while True:
    m = server.metrics()
    if not (m["llamavid_slots_in_use"] or m["llamavid_queue_depth"]) or time.monotonic() > deadline:
      return m
    time.sleep(0.05)


def test_a_soak_of_concurrent_clients_loses_nothing_and_leaks_nothing(soak_server):
  m, server, root = soak_server
  kinds = _requests(m, root)
  client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
  with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
    warm = list(pool.map(lambda i: _one(client, m, kinds, i), range(WARMUP)))
    assert all(right for _, right in warm), warm
    before = _idle(server)
    rss_warm, finished, t0 = server.rss_kib(), _finished(before), time.monotonic()
    got = list(pool.map(lambda i: _one(client, m, kinds, i), range(SOAK)))
  secs = time.monotonic() - t0
  after = _idle(server)
  rss_end = server.rss_kib()
  done = [right for kind, right in got if kind == "ok"]
  dropped = sum(kind == "dropped" for kind, _ in got)
  ended = {k: v - finished.get(k, 0) for k, v in _finished(after).items()}
  print(f"SOAK {SOAK} requests from {CLIENTS} clients in {secs:.1f} s: {len(done)} completed, {dropped} dropped "
        f"mid-stream; engine finishes {ended}; server RSS {rss_warm / 1024:.0f} -> {rss_end / 1024:.0f} MiB "
        f"({100 * (rss_end / rss_warm - 1):+.1f}%); compiles {after['llamavid_compiles_total']:.0f}")
  assert server.proc.poll() is None, server.output()
  assert len(done) == SOAK - SOAK // DROP_EVERY and all(done), [i for i, (_, r) in enumerate(got) if not r]
  assert after["llamavid_slots_in_use"] == 0 and after["llamavid_queue_depth"] == 0
  assert httpx.get(server.url + "/health").status_code == 200
  assert sum(ended.values()) == SOAK and ended.get("error", 0) == 0, ended
  assert rss_end <= 1.10 * rss_warm, (rss_warm, rss_end)
