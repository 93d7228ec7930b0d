"""Decoding: prefill the prompt into a KV cache, then extend it one token at a time.

  generate(model, params, batch, max_new_tokens=64, eos_id=2)        # greedy -> int32[B, 64]
  generate(..., rng=key, **CHAT)                                     # temperature 0.2, top_p 0.7
  for toks in stream(model, params, batch, ...): ...                 # int32[B, k] per chunk
  generate_text(model, params, batch, tokenizer, stop=("###",), ...) # strings cut at stops
  batch = batch_requests([req, ...], text_buckets=(64, 128))         # left padded, bucketed

Decoding stops when every row has ended. `generate` and `stream` jit the prefill and a
scanned chunk of k tokens (one compile each per (batch shapes, settings)) and check on
the host between chunks whether every row has emitted `eos_id` (or, for `generate`, hit
a stop string: `stop_check`); so a budget of 1024 new tokens costs only the chunks the
answers need. The KV cache starts with room for one chunk and doubles when full (padded
slots are masked); a decode chunk updates it in place (donated), a doubling copies it.
Step i's sample is drawn with `fold_in(rng, i)`, so the tokens do not depend on where
decoding stopped: a longer budget's tokens begin with a shorter one's.
After a row emits `eos_id` every later token is `eos_id`. `answers` cuts the decoded
text at stop strings on the host. `batch_requests` left-pads requests of different prompt
lengths and frame counts into one batch whose text length and frame count are rounded
up to buckets, so that a stream of requests compiles once per bucket (the Q-Former
instructions too).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llamavid_jax import parallel
from llamavid_jax.models import LlamaVid
from llamavid_jax.models.llama import KV_ARRAYS
from llamavid_jax.models.splice import batch_spliced_length
from llamavid_jax.ops import attention

log = logging.getLogger(__name__)

CHAT = dict(temperature=0.2, top_p=0.7)   # the release's chat sampling
_INPUTS = ("input_ids", "text_mask", "frame_mask", "qformer_ids", "qformer_mask", "frames", "features")


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """float32[B, V] -> int32[B]: argmax at temperature 0, else a draw from
  softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the
  smallest set whose probability reaches top_p (the most likely token always stays)."""
  if temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ranked = jnp.sort(logits, -1)[:, ::-1]
    probs = jax.nn.softmax(ranked, -1)
    keep = (jnp.cumsum(probs, -1) - probs) < top_p                        # [B, V], a prefix
    floor = jnp.take_along_axis(ranked, keep.sum(-1, keepdims=True) - 1, -1)
    logits = jnp.where(logits < floor, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def _model(model: LlamaVid, dtype: str | None) -> LlamaVid:
  # clone keeps the model's class: a quantized model (quant.py) stays quantized
  return model if dtype is None else model.clone(cfg=dataclasses.replace(model.cfg, dtype=dtype))


def prompt_length(model: LlamaVid, batch: dict) -> int:
  """S' spliced positions of the batch's prompts (models/splice.py: spliced_length)."""
  return batch_spliced_length(batch, model.cfg.tokens_per_frame, movie=model.cfg.movie)


def _prefill(model, params, batch, max_len, prefill_chunk):
  """-> (logits float32[B, V], cache, done bool[B])."""
  inputs = {k: v for k, v in batch.items() if k in _INPUTS}
  # on a mesh that splits the length: frame tokens round the ring, frames fetched per
  # device; a fallback is logged as a decision (prompt shapes vary, so never an error here)
  logits, cache = model.apply({"params": params}, **inputs, max_len=max_len, chunk=prefill_chunk,
                              place=parallel.ring_placement(strict=False), fetch=parallel.frame_fetcher(strict=False),
                              method="prefill_cache")   # by name: a quantized model wraps it
  return logits, cache, jnp.zeros(logits.shape[:1], bool)


def _decode(model, params, state, rng, start, n, eos_id, temperature, top_k, top_p):
  """n steps from `state` = (logits, cache, done); step i (counted from `start`) samples
  with fold_in(rng, i) -> (state, int32[B, n])."""

  def step(carry, i):
    logits, cache, done = carry
    tok = jnp.where(done, eos_id, sample(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p))
    done = done | (tok == eos_id)
    logits, cache = model.apply({"params": params}, tok, cache, method="extend_cache")
    return (logits, cache, done), tok

  state, tokens = jax.lax.scan(step, state, start + jnp.arange(n))
  return state, tokens.T


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 3, 4))
# the state is donated: the decode chunk writes the cache in place (one cache live, not two)
_decode_jit = jax.jit(_decode, static_argnums=(0, 5, 7, 8, 9), donate_argnums=(2,))


@functools.partial(jax.jit, static_argnums=1)
def _grow(state, room: int):
  """The cache of `state` with `room` slots more (masked, not yet valid): decoding past
  the slots it was built with, without a prefill of the whole budget up front. A copy:
  while it runs the old cache and the new one are both live (the only time two are)."""
  logits, cache, done = state
  pad = lambda a, axis: jnp.pad(a, [(0, room if i == axis else 0) for i in range(a.ndim)])
  kv = {n: pad(cache[n], 2) for n in KV_ARRAYS if n in cache}   # [layers, B, T, ...]: slots are axis 2
  cache = dict(cache, **kv, valid=pad(cache["valid"], 1))
  return logits, cache, done


_DECIDED: set[str] = set()


def decide(line: str) -> None:
  """A decision that changes memory or work (a sharded cache's size, padded rows),
  printed once: logged as a warning, so it shows on the console without configuration."""
  if line not in _DECIDED:
    _DECIDED.add(line)
    log.warning("%s", line)


def split_cache(cfg, prompt: int, steps: int) -> int:
  """Under a mesh (`jax.set_mesh` and logical rules) that splits the LLM length over n > 1
  devices: the KV cache's length (0 where the length is whole). The prompt prefills
  with ring attention and the cache is sharded along its length over the same devices,
  so it is made whole from the start: `prompt + steps` slots rounded up to n chunks of
  whole attention blocks (`attention.ring_length`), never grown (growing would move
  slots between devices). Printed once as a decision; an attention without a ring
  (`cfg.attention_impl`) is an error."""
  n = attention.ring_shards("ring")
  if n <= 1:
    return 0
  if cfg.attention_impl not in attention.RING_IMPLS:
    raise ValueError(f"the mesh splits the LLM length over {n} devices but attention_impl "
                     f"{cfg.attention_impl!r} has no ring: use one of {attention.RING_IMPLS}")
  length = attention.ring_length(prompt + steps, n)
  line = (f"KV cache: {length} slots sharded over {n} devices along its length ({length // n} a device), for a "
          f"prompt of {prompt} positions and {steps} new tokens, allocated whole (not grown)")
  decide(line)
  return length


def _chunks(model, params, batch, rng, max_new_tokens, eos_id, chunk, temperature, top_k, top_p, prefill_chunk,
            dtype, ended) -> Iterator[np.ndarray]:
  """Decodes `chunk` tokens per dispatch and yields int32[B, k] numpy chunks until every
  row has emitted `eos_id` (or `ended` says it is over) or `max_new_tokens` are out.
  The cache starts with room for one chunk of new tokens and doubles when full, so a
  budget of 1024 tokens costs what the tokens produced cost: the same prefill and
  decode programs as a budget of one chunk, until an answer outgrows it (then one
  compile per doubling). Padded slots are masked, so they change no token."""
  model = _model(model, dtype)
  chunk = max(1, min(chunk, max_new_tokens))
  steps = -(-max_new_tokens // chunk) * chunk
  room = chunk
  s = prompt_length(model, batch)
  split = split_cache(model.cfg, s, steps)
  if split:
    room = split - s
  state = _prefill_jit(model, params, batch, s + room, prefill_chunk)
  rng = jax.random.key(0) if rng is None else rng
  seen: list[np.ndarray] = []
  for start in range(0, max_new_tokens, chunk):
    if start + chunk > room:
      more = min(room, steps - room)
      state, room = _grow(state, more), room + more
    state, toks = _decode_jit(model, params, state, rng, jnp.int32(start), chunk, eos_id, temperature, top_k, top_p)
    toks = np.asarray(toks)[:, :max_new_tokens - start]
    yield toks
    done = np.asarray(state[2])
    if ended is not None and not done.all():
      seen.append(toks)
      done = done | np.asarray(ended(np.concatenate(seen, 1)), bool)
    if done.all():
      return


def generate(model: LlamaVid, params, batch: dict, rng: jax.Array | None = None, *, max_new_tokens: int,
             eos_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, prefill_chunk: int = 0,
             dtype: str | None = None, chunk: int = 8, ended: Callable[[np.ndarray], np.ndarray] | None = None
             ) -> np.ndarray:
  """batch: the model's inputs (input_ids, text_mask, frame_mask, qformer_ids,
  qformer_mask, frames | features; padding left, right or both) -> int32[B, max_new_tokens]
  new tokens; after a sample's `eos_id` every further token is `eos_id`.
  temperature 0 = greedy; `prefill_chunk` C > 0 prefills C positions at a time;
  `dtype` overrides the model config's compute dtype ("bfloat16", "float32").

  Decoding stops once every row has ended: emitted `eos_id`, or `ended(tokens int[B, n])
  -> bool[B]` (a host check between chunks of `chunk` tokens: `stop_check`'s stop
  strings) says so; the rest of the budget is filled with `eos_id` without being
  computed. A longer budget's tokens begin with a shorter one's (greedy, and sampled
  with the same `rng`), with the same `chunk`."""
  parts = list(_chunks(model, params, batch, rng, max_new_tokens, eos_id, chunk, temperature, top_k, top_p,
                       prefill_chunk, dtype, ended))
  toks = np.concatenate(parts, 1)
  return np.pad(toks, ((0, 0), (0, max_new_tokens - toks.shape[1])), constant_values=eos_id)


def teacher_logprobs(model: LlamaVid, params, batch: dict, teacher: jax.Array, chunk: int = 0) -> np.ndarray:
  """float32[B, n]: log p(teacher[:, i]) at decode step i through the cached path (prefill
  in `chunk`-position pieces, then `extend_cache` with the teacher's tokens): how a KV
  cache or weight format changes what decoding sees (bench/generate.py, the tests)."""
  max_len = prompt_length(model, batch) + teacher.shape[1]

  def run(p):
    logits, cache = model.apply({"params": p}, **batch, max_len=max_len, chunk=chunk, method="prefill_cache")

    def step(carry, tok):
      logits, cache = carry
      lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], 1)[:, 0]
      return model.apply({"params": p}, tok, cache, method="extend_cache"), lp

    return jax.lax.scan(step, (logits, cache), teacher.T)[1].T

  return np.asarray(jax.jit(run)(params))


def stream(model: LlamaVid, params, batch: dict, rng: jax.Array | None = None, *, max_new_tokens: int,
           eos_id: int, chunk: int = 8, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           prefill_chunk: int = 0, dtype: str | None = None) -> Iterator[np.ndarray]:
  """`generate`, yielding int32[B, k] numpy chunks of k = `chunk` tokens (the last one
  shorter) as they are produced; stops once every row has emitted `eos_id`.
  The concatenated chunks equal `generate`'s tokens up to where it stopped."""
  yield from _chunks(model, params, batch, rng, max_new_tokens, eos_id, chunk, temperature, top_k, top_p,
                     prefill_chunk, dtype, None)


def stop_check(tokenizer, eos_id: int, stop: Sequence[str]) -> Callable[[np.ndarray], np.ndarray] | None:
  """`generate`'s `ended` for stop strings: int[B, n] tokens so far -> bool[B], True
  where a row's text (up to its `eos_id`, decoded as `answers` does) contains one of
  `stop`; None without stop strings."""
  stop = [s for s in stop if s]
  if not stop:
    return None

  def ended(tokens: np.ndarray) -> np.ndarray:
    rows = [r[:r.index(eos_id)] if eos_id in r else r for r in np.asarray(tokens).tolist()]
    return np.array([any(s in tokenizer.decode(r, skip_special_tokens=True) for s in stop) for r in rows])

  return ended


def answers(tokens, tokenizer, *, eos_id: int, stop: Sequence[str] = ()) -> list[str]:
  """int[B, n] generated ids -> B strings: each row up to its first `eos_id`, decoded
  without special tokens and cut before the first of the `stop` strings (a template's
  separator: "###", "</s>")."""
  out = []
  for row in np.asarray(tokens).tolist():
    row = row[:row.index(eos_id)] if eos_id in row else row
    text = tokenizer.decode(row, skip_special_tokens=True)
    cut = min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))
    out.append(text[:cut].strip())
  return out


def generate_text(model: LlamaVid, params, batch: dict, tokenizer, *, stop: Sequence[str] = (),
                  eos_id: int | None = None, **kw) -> list[str]:
  """`generate` (kw: max_new_tokens, rng, sampling, ...) -> B answers cut at eos and
  at the stop strings; eos_id defaults to the tokenizer's."""
  eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
  toks = generate(model, params, batch, eos_id=eos_id, ended=stop_check(tokenizer, eos_id, stop), **kw)
  return answers(toks, tokenizer, eos_id=eos_id, stop=stop)


# --- batching requests ------------------------------------------------------------------
def bucket(n: int, buckets: Sequence[int] | None = None) -> int:
  """The smallest of `buckets` >= n (None: the next power of two)."""
  if buckets is None:
    return 1 << max(n - 1, 0).bit_length()
  fits = [b for b in buckets if b >= n]
  if not fits:
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")
  return min(fits)


def batch_requests(requests: Sequence[dict], *, text_buckets: Sequence[int] | None = None,
                   frame_buckets: Sequence[int] | None = None, pad_id: int = 0,
                   qformer_buckets: Sequence[int] | None = None) -> dict:
  """Requests (input_ids int[S_i]; frames float[T_i, H, W, 3] or features
  float[T_i, N+1, C]; qformer_ids, qformer_mask [L] or [P, L]) -> one model batch:
  text LEFT padded to the text bucket of the longest prompt, frames padded at the end
  to the frame bucket of the longest video (frame_mask marks the real ones), the
  Q-Former instructions right padded to the Q-Former bucket of the longest (a chat's
  questions of other lengths reuse one compile)."""
  media = "frames" if "frames" in requests[0] else "features"
  s = bucket(max(len(r["input_ids"]) for r in requests), text_buckets)
  t = bucket(max(len(r[media]) for r in requests), frame_buckets)
  l = bucket(max(np.shape(r["qformer_ids"])[-1] for r in requests), qformer_buckets)
  out = {k: [] for k in ("input_ids", "text_mask", "frame_mask", "qformer_ids", "qformer_mask", media)}
  for r in requests:
    ids, m = np.asarray(r["input_ids"], np.int32), np.asarray(r[media])
    out["input_ids"].append(np.pad(ids, (s - len(ids), 0), constant_values=pad_id))
    out["text_mask"].append(np.arange(s) >= s - len(ids))
    out[media].append(np.pad(m, [(0, t - len(m))] + [(0, 0)] * (m.ndim - 1)))
    out["frame_mask"].append(np.arange(t) < len(m))
    for k in ("qformer_ids", "qformer_mask"):
      q = np.asarray(r[k])
      out[k].append(np.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, l - q.shape[-1])]))
  return {k: np.stack(v) for k, v in out.items()}
