"""Serving throughput: `eval.serve` on 127.0.0.1 driven by the `openai` client.

  python bench/serve.py [--ckpt DIR] [--levels 1,8,32] [--requests 64] [--max-tokens 32]
      [--slots 32] [--dtype float32]

Without --ckpt the model is the tiny one (configs/tiny.py, random parameters) with a
word-level tokenizer of the synthetic data's words (llamavid_jax/data/synthetic.py). The
same `--requests` greedy requests (images, 2- and 4-frame clips as image_url frames, and
text-only questions; budgets cycling over 1/2, 3/4 and all of --max-tokens) run at each
level of concurrent clients, streaming. Printed per level:
- tokens/s: generated tokens (usage) over the level's wall time;
- TTFT p50 / p99: submission to first token, as the engine records it;
- latency p50 / p99: each request's wall time at the client;
- slot use: mean slots in use per decode step, as a fraction of --slots;
- x one-at-a-time: tokens/s over the 1-client level's (the same requests one at a time).
Every shape is compiled by a warm-up pass first; the figures are of one run (the dev CPU
is shared: expect them to swing).
"""

import argparse
import base64
import concurrent.futures
import io
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import serve  # noqa: E402
from llamavid_jax import engine as engine_lib  # noqa: E402
from llamavid_jax import inference  # noqa: E402

QUESTIONS = ["What color is the object?", "How many objects are there?",
             "Which direction does the shape move? What color is the shape?"]


def tiny_model(dtype: str) -> inference.Model:
  """configs/tiny.py with random parameters and synthetic-word tokenizers."""
  import jax
  from flax import linen as nn

  from configs import tiny
  from llamavid_jax import generate as gen
  from llamavid_jax.checkpoint import orbax_io
  from llamavid_jax.data import synthetic
  from llamavid_jax.data.tokenizer import load_llm_tokenizer, load_qformer_tokenizer
  from llamavid_jax.models import LlamaVid

  cfg = tiny.model_config()
  d = tempfile.mkdtemp(prefix="bench_serve_")
  words = synthetic.vocabulary()
  synthetic.build_llm_tokenizer(os.path.join(d, "llm"), words)
  synthetic.build_qformer_tokenizer(os.path.join(d, "bert"), words)
  size = cfg.vision.image_size
  req = dict(input_ids=np.array([1, cfg.image_token_id, 5], np.int32), frames=np.zeros((1, size, size, 3), np.float32),
             qformer_ids=np.ones(8, np.int32), qformer_mask=np.ones(8, bool))
  params = nn.unbox(jax.jit(LlamaVid(cfg).init)(jax.random.key(0), **gen.batch_requests([req]))["params"])
  loaded = orbax_io.Inference(cfg, params, load_llm_tokenizer(os.path.join(d, "llm")),
                              load_qformer_tokenizer(os.path.join(d, "bert")), {})
  return inference.Model(loaded, dtype=dtype)


def _image_url(rng, w: int, h: int) -> dict:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
  url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
  return {"type": "image_url", "image_url": {"url": url}}


def requests(n: int, max_tokens: int) -> list[dict]:
  """n chat requests: media cycling over one image, 2 and 4 frames, none."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    frames = (1, 2, 4, 0)[i % 4]
    parts = [_image_url(rng, 32 + 8 * (i % 3), 24 + 8 * (i % 2)) for _ in range(frames)]
    parts.append({"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]})
    budget = max(1, max_tokens * (2 + i % 3) // 4)
    out.append(dict(messages=[{"role": "user", "content": parts}], max_tokens=budget, temperature=0, seed=0))
  return out


def run_level(client, model_name: str, reqs: list[dict], clients: int):
  """-> (wall s, [(latency s, completion tokens)])."""
  def one(body):
    t0 = time.perf_counter()
    tokens = 0
    for chunk in client.chat.completions.create(model=model_name, stream=True,
                                                stream_options={"include_usage": True}, **body):
      if chunk.usage is not None:
        tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t0, tokens

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    out = list(pool.map(one, reqs))
  return time.perf_counter() - t0, out


def pct(xs, p: float) -> float:
  return float(np.percentile(np.asarray(xs), p)) if len(xs) else float("nan")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", help="a checkpoint directory (default: the tiny model, random parameters)")
  ap.add_argument("--levels", default="1,8,32", help="concurrent clients, comma separated")
  ap.add_argument("--requests", type=int, default=64)
  ap.add_argument("--max-tokens", type=int, default=32)
  ap.add_argument("--slots", type=int, default=32)
  ap.add_argument("--max-positions", type=int, default=256)
  ap.add_argument("--dtype", default="float32", choices=inference.DTYPES)
  a = ap.parse_args()
  levels = [int(x) for x in a.levels.split(",")]
  import openai

  m = inference.load(a.ckpt, dtype=a.dtype) if a.ckpt else tiny_model(a.dtype)
  eng = engine_lib.Engine(m, slots=a.slots, max_positions=a.max_positions, max_queue=max(levels) + a.requests)
  running = serve.Running(serve.make_app(eng, "bench", serve.Limits(max_tokens=a.max_tokens)))
  client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=600)
  reqs = requests(a.requests, a.max_tokens)
  try:
    t0 = time.perf_counter()
    run_level(client, "bench", reqs[:12], 12)   # every (media, question) pair: every shape compiled
    print(f"{m.cfg.llm.num_layers}-layer d_model {m.cfg.llm.d_model} LLM, {a.dtype}, {a.slots} slots x "
          f"{a.max_positions} positions, {a.requests} requests of <= {a.max_tokens} tokens; warm-up "
          f"{time.perf_counter() - t0:.1f} s, {eng.compiles} compiles")
    print(f"{'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8} "
          f"{'slot use':>8} {'x one-at-a-time':>15}")
    base = None
    for c in levels:
      ttft0, steps0, busy0 = eng.ttft_count, eng.steps, eng.busy_row_steps
      wall, out = run_level(client, "bench", reqs, c)
      tps = sum(t for _, t in out) / wall
      ttft = list(eng.ttft)[-(eng.ttft_count - ttft0):] if eng.ttft_count > ttft0 else []
      steps = eng.steps - steps0
      use = (eng.busy_row_steps - busy0) / (steps * eng.slots) if steps else 0.0
      base = tps if c == 1 else base
      lat = [t for t, _ in out]
      ratio = f"{tps / base:.2f}" if base else "-"
      print(f"{c:>7} {tps:>9.1f} {pct(ttft, 50):>8.3f}s {pct(ttft, 99):>8.3f}s {pct(lat, 50):>7.3f}s "
            f"{pct(lat, 99):>7.3f}s {use:>8.2f} {ratio:>15}", flush=True)
    print(f"compiles after all levels: {eng.compiles}")
  finally:
    running.stop()
    eng.close()


if __name__ == "__main__":
  main()
