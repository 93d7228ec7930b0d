"""Peak memory and time of hour-long movie inference with the tiny model (CPU).

  python bench/movie_inference.py [--frames 900,1800,3600] [--chunk 1024] [--json]

A movie is T frames of ViT features (float16 [T, N+1, C], the tiny ViT's shape) with
the release's subtitle-interleaved `inputs` (one `<image>` per frame, a few subtitle
words after every 10th), written as a `.safetensors` movie file and answered the way
`eval.chat --features movie.safetensors --question Q` answers it
(`llamavid_jax/inference.py`: the release's movie prompt, movie mode, prefill in
chunks of `--chunk` positions, then 16 greedy tokens). 1 fps: 3600 frames = an hour =
7200 visual tokens. The LLM uses linear RoPE scaling ceil(S / 4096) as the release's
long-video stage. Every length runs in a fresh process, so each peak RSS (ru_maxrss)
is that length's own. Prints T, the LLM positions, peak RSS, seconds (compile and run)
and the RSS of the chunk-free prefill for comparison where `--compare` is set.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_FRAMES = flags.DEFINE_list("frames", ["900", "1800", "3600"], "movie lengths in frames (1 fps)")
_CHUNK = flags.DEFINE_integer("chunk", 1024, "prefill chunk (LLM positions); 0: the whole prompt at once")
_JSON = flags.DEFINE_bool("json", False, "one JSON object per length")
_ONE = flags.DEFINE_integer("one", 0, "internal: measure this length in this process")


def measure(frames: int, chunk: int) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import dataclasses
  import math

  import numpy as np
  from configs import tiny
  from llamavid_jax import inference
  from llamavid_jax.checkpoint.orbax_io import Inference
  from llamavid_jax.data import features
  from llamavid_jax.models import LlamaVid
  from tests import data_fixtures

  tmp = tempfile.mkdtemp()
  cfg = tiny.model_config()
  positions = frames * cfg.tokens_per_frame + frames * 2 + 200          # visual + subtitles + prompt
  factor = math.ceil(positions / 4096)
  llm = dataclasses.replace(cfg.llm, max_positions=4096 * factor, rope_scaling=float(factor))
  cfg = dataclasses.replace(cfg, llm=llm, compress_type="mean", attention_impl="chunked", frame_chunk=0)
  ids = dict(input_ids=np.zeros((1, 4), np.int32), text_mask=np.ones((1, 4), bool), frame_mask=np.ones((1, 1), bool),
             qformer_ids=np.ones((1, 4), np.int32), qformer_mask=np.ones((1, 4), bool),
             features=np.zeros((1, 1) + cfg.feature_shape, np.float32))
  import jax
  params = jax.jit(LlamaVid(cfg).init)(jax.random.key(0), **ids)["params"]
  tok = data_fixtures.make_llm_tokenizer(os.path.join(tmp, "llm"))
  qtok = data_fixtures.make_bert_tokenizer(os.path.join(tmp, "bert"))
  from llamavid_jax.data import tokenizer as tok_lib
  m = inference.Model(Inference(cfg, params, tok_lib.load_llm_tokenizer(tok),
                                tok_lib.load_qformer_tokenizer(qtok, max_length=cfg.qformer.max_text_len), {}))
  n1, c = cfg.feature_shape
  feats = np.random.default_rng(0).standard_normal((frames, n1, c)).astype(np.float16)
  inputs = "".join("<image>" + (" what a day" if t % 10 == 0 else "") for t in range(frames))
  path = os.path.join(tmp, "movie.safetensors")
  features.write_safetensors(path, features.Movie(feats, inputs))
  t0 = time.perf_counter()
  media = m.media(features=path)
  req = m.request("What happens in the movie?", media)
  [ans] = m.generate([req], max_new_tokens=16, prefill_chunk=chunk)
  seconds = time.perf_counter() - t0
  s = int(len(req["input_ids"]) + frames * (cfg.tokens_per_frame - 1))
  return dict(frames=frames, llm_positions=s, rope_factor=factor, prefill_chunk=chunk,
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds=seconds,
              answer_tokens=len(ans.token_ids))


def main(argv):
  del argv
  if _ONE.value:
    print(json.dumps(measure(_ONE.value, _CHUNK.value)))
    return
  rows = []
  for t in map(int, _FRAMES.value):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={t}", f"--chunk={_CHUNK.value}"],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                                  XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    if out.returncode:
      sys.exit(f"{t} frames failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(r)
    if _JSON.value:
      print(json.dumps(r), flush=True)
    else:
      print(f"{r['frames']:5d} frames  {r['llm_positions']:6d} positions (RoPE x{r['rope_factor']})  "
            f"chunk {r['prefill_chunk']}  peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB  {r['seconds']:.1f} s",
            flush=True)
  if not _JSON.value and len(rows) > 1:
    a, b = rows[0], rows[-1]
    print(f"RSS growth {a['frames']} -> {b['frames']} frames: {b['peak_rss_bytes'] / a['peak_rss_bytes']:.2f}x "
          f"for {b['frames'] / a['frames']:.1f}x the frames")


if __name__ == "__main__":
  app.run(main)
