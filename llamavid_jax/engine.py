"""Continuous batching: one loaded model, a fixed number of decode slots, requests that
join and leave the running batch at step boundaries.

  eng = engine.Engine(inference.load("out/"), slots=16, max_positions=2048)
  h = eng.submit(m.request(["What is he doing?"], media), engine.Sampling(max_tokens=64))
  for piece in h: print(piece, end="")          # text as it is produced (or h.result())
  h.cancel()                                     # frees its slot at the next step
  eng.close()

A background thread runs the step loop: it admits queued requests into free slots
(their prefill, each one's KV cache written into its slot's row), then runs
`decode_chunk` decode steps of every slot in one dispatch, hands each row's new tokens
to its request (text pieces, cut at eos, at the token budget and before stop strings,
as `inference.Model.generate` cuts them) and frees the slot of every row that ended.

The KV cache is float[layers, slots, max_positions, K, Dh] (with `kv_cache="int8"`:
int8 plus a float32 scale per slot and head, `llama.cache_spec`); each row keeps its own
write index, positions and slot mask (`valid`), so rows of different prompt lengths
and ages decode together: one decode step is `LlamaVid.extend_cache` of all rows, each
writing at its own index and attending over its own valid slots (a row's logits are
those of it as a batch of one), with no copy of the cache. A row samples with its own
temperature, top_p and seed: step i of a request draws with fold_in(key(seed), i), as
`generate.generate` does for a batch of one, so a request's tokens are those of
`Model.generate([req])` with the same arguments, greedy or sampled, whatever else runs
beside it.

Batched prefill (`prefill_batch` > 1; default 1, one request a dispatch): queued
requests of one prefill shape (the same mode and buckets: the same arrays' shapes) are
prefilled together, as a batch of k rows in one dispatch, k the power of two (at most
`prefill_batch` and the free slots) that the waiting ones of that shape fill; a row's
cache, logits and tokens are those of its prefill alone (a chunked prefill, below,
takes one request at a time). A group size k of a shape compiles when a k-th request of
that shape waits at once with the others (below), so a lone request compiles one
prefill, and only a load that can form a group compiles its size.

Compiles are bounded: the decode step compiles once per span (below); a prefill (a chunked prefill's
embedding) compiles once per (video_mode, media kind, text bucket, frame bucket,
Q-Former bucket, rows k: 1, 2, 4, .. up to prefill_batch), the buckets being
`generate.batch_requests`'s (powers of two unless given), all capped by
`max_positions`. `compiles` counts the distinct shapes run so far (`shapes`). The
engine's thread only runs compiled programs: the decode steps compile at start, and the
thread that submits a request compiles, ahead of time, what its prefill can run that is
not compiled yet (`_compile_ahead`) before it is queued: the prefill of its shape alone,
and each group size its shape's waiting requests, it among them, could now form. That
request waits for it; the running streams do not.

Chunked prefill (`prefill_chunk` C > 0): a request's prompt is first embedded (ViT /
Q-Former / token generator and the splice, one dispatch) into a stage of its own, then
run through the LLM C positions per dispatch (`LlamaVid.prefill_step`), one loop turn
at a time with a decode dispatch of the running rows between turns, and written into
its row after its last chunk; so a long movie's prompt no longer stalls the other
streams for its whole prefill, only for one chunk at a time (the visual encoding still
runs whole). A turn's chunks hold at most C positions in all (short prompts share a
turn). The last chunk of a prompt is the power of two (at most C) that covers what is
left, so the chunk step compiles once per size: at most 1 + log2(C) shapes, whatever
the prompts' lengths. The stage holds ceil(max_positions / C) * C slots of one request
(its keys and values, its embeddings), about one slot's cache more than the rows.

Decode spans: a decode dispatch attends over the cache's first `span` slots only, the
smallest power of two (at least MIN_SPAN, at most max_positions) that holds every row in
use after the dispatch, and a prompt is prefilled into the power of two of slots that
holds it. So a step costs what the longest live row needs, not max_positions: an
engine sized for a 1024-token budget decodes short answers at the cost of short rows.
Each span's decode step is compiled at start (log2(max_positions / MIN_SPAN) + 1
compiles). Not here: paged attention (a row still reserves max_positions slots).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
import traceback
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llamavid_jax import generate as gen
from llamavid_jax import inference, validation
from llamavid_jax.models.llama import KV_ARRAYS, cache_spec
from llamavid_jax.models.splice import batch_spliced_length

MIN_SPAN = 64   # the shortest decode span (`Engine.spans`): below it a dispatch's cost is not the cache's
_INPUTS = ("input_ids", "text_mask", "frame_mask", "qformer_ids", "qformer_mask", "frames", "features")


class QueueFull(RuntimeError):
  """The request queue holds `max_queue` requests already: try again later."""


class RequestTooLarge(ValueError):
  """A request that cannot fit a slot: `field` names what is too large."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


class EngineStopped(RuntimeError):
  """The engine was closed (or its loop died) before the request ended."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Per-request generation settings. temperature 0: greedy; `max_tokens`: the token
  budget; `stop`: strings the answer is cut before (it ends at the first)."""

  max_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  token_ids: list[int]        # generated ids without the prompt, cut at eos / stop (as `inference.Answer`)
  finish_reason: str          # "stop" (eos or a stop string), "length" (budget), "cancelled"
  prompt_tokens: int          # the prompt's LLM positions (text + visual tokens)
  completion_tokens: int      # tokens generated (eos included)


class Handle:
  """One submitted request: its text pieces as they come (iterate, or `on_event`),
  `result()`, `cancel()`, and the engine's timestamps (time.monotonic()): submitted,
  started (prefilled into its slot), first_token, finished; `start_step` /
  `finish_step`: the engine's decode-step count then; `prefill_steps`: that count at
  each chunk of a chunked prefill."""

  def __init__(self, rid: int, request: dict, sampling: Sampling, positions: int,
               on_event: Callable[[str, object], None] | None):
    self.id, self.request, self.sampling, self.positions = rid, request, sampling, positions
    self.on_event = on_event
    self.events: queue.Queue = queue.Queue()
    self.submitted = time.monotonic()
    self.started = self.first_token = self.finished = None
    self.start_step = self.finish_step = None
    self.prefill_steps: list[int] = []
    self.slot: int | None = None
    self.batch: dict | None = None   # its prefill batch (`Engine.batch`)
    self.shape: tuple = ()           # its prefill's shape (requests of one shape prefill together)
    self.waiting = False             # counted in its engine's `_waiting` (queued, not yet prefilled)
    self.prompt_tokens = (0, 0)   # (array of int, index): its prompt positions, read when it ends
    self.ids: list[int] = []
    self.shown = ""
    self.completion: Completion | None = None
    self.error: BaseException | None = None
    self._cancelled = threading.Event()
    self._done = threading.Event()

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set()

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def cancel(self) -> None:
    """Ends the request at the next step boundary (its slot freed), or drops it from the
    queue; a finished request stays as it is."""
    self._cancelled.set()

  def _emit(self, kind: str, payload: object) -> None:
    self.events.put((kind, payload))
    if self.on_event is not None:
      self.on_event(kind, payload)

  def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
    if self._done.is_set():
      return
    self.completion, self.error, self.finished = completion, error, time.monotonic()
    self._done.set()
    self._emit("error", error) if error is not None else self._emit("done", completion)

  def __iter__(self) -> Iterator[str]:
    while True:
      kind, payload = self.events.get()
      if kind == "delta":
        yield payload
      elif kind == "error":
        raise payload
      else:
        return

  def result(self, timeout: float | None = None) -> Completion:
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
    if self.error is not None:
      raise self.error
    return self.completion


@dataclasses.dataclass
class _Filling:
  """A request being prefilled chunk by chunk: its stage (`_stage`), the next slot to fill."""
  h: Handle
  stage: dict
  start: int = 0


# --- the jitted steps ---------------------------------------------------------------------
def _sample_rows(logits, key_data, steps, temperature, top_p):
  """float32[B, V] logits, uint32[B, 2] keys, int32[B] steps, float32[B] temperature /
  top_p -> int32[B]: row r is `generate.sample` of a batch of one with
  fold_in(key_r, step_r) (argmax at temperature 0)."""

  def one(lg, kd, i, t, p):
    key = jax.random.fold_in(jax.random.wrap_key_data(kd), i)
    scaled = lg / jnp.where(t > 0, t, 1.0)
    ranked = jnp.sort(scaled)[::-1]
    probs = jax.nn.softmax(ranked)
    keep = (jnp.cumsum(probs) - probs) < p
    floor = ranked[keep.sum() - 1]
    scaled = jnp.where((p < 1.0) & (scaled < floor), -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled[None])[0]
    return jnp.where(t > 0, drawn, jnp.argmax(lg)).astype(jnp.int32)

  # a batch of greedy rows takes the argmax alone: the sort for top_p is most of a
  # small model's step (a sampled row takes the same argmax in `one` when its t is 0)
  return jax.lax.cond(jnp.any(temperature > 0), lambda: jax.vmap(one)(logits, key_data, steps, temperature, top_p),
                      lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _decode(model, params, st, n: int, eos_id: int, span: int):
  """n decode steps of every row, attending over the cache's first `span` slots (every
  row in use ends below it after the n steps; `Engine._span`) -> (state, int32[B, n]
  tokens); a row that emitted eos emits eos after it. Each row writes at its own slot
  (`LlamaVid.extend_cache` with int32[B] indices: a row's logits are those of it decoded
  as a batch of one); a free row's writes past the cache's end are dropped, and
  admission rewrites the row."""

  def step(st, _):
    tok = _sample_rows(st["logits"], st["key"], st["step"], st["temperature"], st["top_p"])
    tok = jnp.where(st["done"], eos_id, tok)
    # by name: a quantized model wraps it
    logits, cache = model.apply({"params": params}, tok, st["cache"], span, method="extend_cache")
    st = dict(st, logits=logits, cache=cache, done=st["done"] | (tok == eos_id), step=st["step"] + 1)
    return st, tok

  st, toks = jax.lax.scan(step, st, None, length=n)
  return st, toks.T


def _write_row(st, row, logits, c, seed, temperature, top_p):
  """Row `row` of the state <- a prefilled request: float32[V] logits, c a batch-of-one
  cache of the state's first L <= T slots (k, v [layers, 1, L, K, Dh], valid [1, L],
  index int32[], pos [1]), its sampling (uint32 seed: its key is key(seed), made here,
  in the compiled program, not by eager ops per request); its step count starts at 0.
  The row's slots past L keep stale keys, masked (not valid) until the row writes them."""
  cache = st["cache"]
  length = c["valid"].shape[1]
  kv = {n: cache[n].at[:, row, :length].set(c[n][:, 0].astype(cache[n].dtype)) for n in KV_ARRAYS if n in cache}
  valid = jnp.zeros_like(cache["valid"][row]).at[:length].set(c["valid"][0])
  cache = dict(kv, valid=cache["valid"].at[row].set(valid), index=cache["index"].at[row].set(c["index"]),
               pos=cache["pos"].at[row].set(c["pos"][0]))
  return dict(st, cache=cache, logits=st["logits"].at[row].set(logits), done=st["done"].at[row].set(False),
              step=st["step"].at[row].set(0), key=st["key"].at[row].set(jax.random.key_data(jax.random.key(seed))),
              temperature=st["temperature"].at[row].set(temperature), top_p=st["top_p"].at[row].set(top_p))


def _admit(model, params, st, batch, rows, seeds, temperature, top_p, max_len: int):
  """Prefills k requests of one shape (a batch of k; int32[k] rows, uint32[k] seeds,
  float32[k] temperature / top_p) into a fresh cache of `max_len` slots (the power of two
  that holds their prompts: their attention reads no more) and writes request i into
  the first `max_len` slots of row rows[i] of the state -> (state, int32[k] their prompt
  positions)."""
  inputs = {k: v for k, v in batch.items() if k in _INPUTS}
  logits, c = model.apply({"params": params}, **inputs, max_len=max_len, method="prefill_cache")
  for i in range(logits.shape[0]):
    one = dict({n: c[n][:, i:i + 1] for n in KV_ARRAYS if n in c}, valid=c["valid"][i:i + 1], index=c["index"],
               pos=c["pos"][i:i + 1])
    st = _write_row(st, rows[i], logits[i], one, seeds[i], temperature[i], top_p[i])
  return st, c["pos"]


# --- chunked prefill: a request's prompt over several dispatches, decode steps between ---
def _stage(model, params, batch, length: int):
  """One request's prompt embedded (its visual tokens spliced in) into a prefill stage
  of `length` slots: dict(x float[1, length, D], positions int32[1, length], valid
  bool[1, length], last int32[1] the last real slot, index int32[] S' its slots, pos
  int32[1] its positions, kv the cache's arrays (`cache_spec`: k, v, int8's scales) zeros, logits
  float32[1, V]); slots past S' are zero and not valid."""
  inputs = {k: v for k, v in batch.items() if k in _INPUTS}
  x, layout, _ = model.apply({"params": params}, **inputs, method="embed_inputs")   # by name: a quantized model wraps it
  b, s = layout.valid.shape
  pad = lambda a: jnp.pad(a, [(0, 0), (0, length - s)] + [(0, 0)] * (a.ndim - 2))
  positions = jnp.maximum(jnp.cumsum(layout.valid, axis=1) - 1, 0).astype(jnp.int32)
  last = jnp.max(jnp.where(layout.valid, jnp.arange(s), 0), axis=1).astype(jnp.int32)
  llm = model.cfg.llm
  kv = {n: jnp.zeros(a.shape, a.dtype) for n, a in cache_spec(llm, b, length, x.dtype, model.cfg.kv_cache).items()}
  return dict(x=pad(x), positions=pad(positions), valid=pad(layout.valid), last=last, index=jnp.int32(s),
              pos=layout.valid.sum(axis=1).astype(jnp.int32), kv=kv,
              logits=jnp.zeros((b, llm.vocab_size), jnp.float32))


def _fill(model, params, stage, start, size: int):
  """The LLM over the stage's slots start .. start + size - 1 (`LlamaVid.prefill_step`)
  -> the stage with their keys and values written (and the logits, once `last` is in)."""
  x = jax.lax.dynamic_slice_in_dim(stage["x"], start, size, axis=1)
  positions = jax.lax.dynamic_slice_in_dim(stage["positions"], start, size, axis=1)
  logits, kv = model.apply({"params": params}, x, positions, stage["valid"], stage["kv"], start, stage["last"],
                           method="prefill_step")   # by name: a quantized model wraps it
  mine = (stage["last"] >= start) & (stage["last"] < start + size)
  return dict(stage, kv=kv, logits=jnp.where(mine[:, None], logits, stage["logits"]))


def _install(st, stage, row, seed, temperature, top_p, max_len: int):
  """A fully prefilled stage written into row `row` of the state (its first `max_len` slots)."""
  cut = lambda a: a[:, :, :max_len]
  c = dict({n: cut(a) for n, a in stage["kv"].items()}, valid=stage["valid"][:, :max_len],
           index=stage["index"], pos=stage["pos"])
  return _write_row(st, row, stage["logits"][0], c, seed, temperature, top_p)


def _seed32(seed: int) -> np.uint32:
  """A sampling seed as the uint32 that `jax.random.key` takes it as (with x64 off, a
  Python int's low 32 bits: key(seed) == key(_seed32(seed)))."""
  return np.uint32(seed % 2 ** 32)


def _group_sizes(n: int) -> list[int]:
  """The prefill group sizes an engine of prefill_batch n forms: the powers of two up to n."""
  return [1 << i for i in range(n.bit_length())]


def decode_spans(max_positions: int) -> list[int]:
  """The decode spans of an engine of `max_positions` slots a row: the powers of two from
  MIN_SPAN below it, and itself (one decode compile each)."""
  return sorted({max_positions} | {1 << k for k in range(MIN_SPAN.bit_length() - 1, 31) if 1 << k < max_positions})


def cache_bytes(cfg, slots: int, max_positions: int, dtype: str) -> int:
  """Bytes of the engine's KV cache: K and V of every LLM layer for `slots` rows of
  `max_positions` positions in `dtype`, or in `cfg.kv_cache`'s format (int8 and its
  scales) (what the CLIs print before compiling)."""
  spec = cache_spec(cfg.llm, slots, max_positions, dtype, cfg.kv_cache)
  return sum(a.size * a.dtype.itemsize for a in spec.values())


def prompt_positions(model: inference.Model, request: dict) -> int:
  """Cache slots a request's prompt takes in an engine with the default buckets (what
  `Engine.positions` gives): for sizing an engine before making it."""
  cfg = dataclasses.replace(model.cfg, video_mode=request.get("video_mode", "clip"))
  batch = gen.batch_requests([request], pad_id=model.tokenizer.pad_token_id)
  return batch_spliced_length(batch, cfg.tokens_per_frame, movie=cfg.movie)


# one jit each for every engine of the process: engines of the same model and shapes share
# their compiles (eval.chat makes one per call)
_decode_jit = jax.jit(_decode, static_argnums=(0, 3, 4, 5), donate_argnums=(2,))
_admit_jit = jax.jit(_admit, static_argnums=(0, 8), donate_argnums=(2,))
_stage_jit = jax.jit(_stage, static_argnums=(0, 3))
_fill_jit = jax.jit(_fill, static_argnums=(0, 4), donate_argnums=(2,))
_install_jit = jax.jit(_install, static_argnums=(6,), donate_argnums=(0,))


class Engine:
  """`slots` decode rows of `max_positions` cache slots each (prompt, spliced and
  bucketed, plus answer) over one `inference.Model`; at most `max_queue` requests wait.
  `decode_chunk` steps run per dispatch (a request joins or leaves between them).
  `prefill_chunk` C > 0: a request's prompt is prefilled C positions per dispatch,
  with a decode dispatch of the running rows between (0: each prompt in one dispatch).
  `prefill_batch`: at most this many queued requests of one shape are prefilled in one
  dispatch (1: one at a time). text / frame / qformer buckets:
  `generate.batch_requests`'s (None: powers of two)."""

  def __init__(self, model: inference.Model, *, slots: int = 16, max_positions: int = 2048,
               decode_chunk: int = 4, max_queue: int = 64, prefill_chunk: int = 0, prefill_batch: int = 1,
               text_buckets: Sequence[int] | None = None, frame_buckets: Sequence[int] | None = None,
               qformer_buckets: Sequence[int] | None = None, start: bool = True):
    if slots < 1 or max_positions < 2 or decode_chunk < 1 or max_queue < 0 or prefill_chunk < 0 or prefill_batch < 1:
      raise ValueError(f"engine: slots {slots}, max_positions {max_positions}, decode_chunk {decode_chunk}, "
                       f"max_queue {max_queue}, prefill_chunk {prefill_chunk}, prefill_batch {prefill_batch}: need "
                       "slots >= 1, max_positions >= 2, decode_chunk >= 1, max_queue >= 0, prefill_chunk >= 0, "
                       "prefill_batch >= 1")
    self.m, self.slots, self.max_positions = model, slots, max_positions
    self.decode_chunk, self.max_queue, self.prefill_chunk = decode_chunk, max_queue, prefill_chunk
    self.prefill_batch = prefill_batch
    self.buckets = dict(text_buckets=text_buckets, frame_buckets=frame_buckets, qformer_buckets=qformer_buckets)
    self.eos_id = model.eos_id
    self.tokenizer_lock = threading.Lock()   # fast tokenizers are not safe to call from two threads at once
    # the model's own module per video mode (`Model.model_for`: a quantized model keeps its
    # wrapper), computing in the model's dtype
    self._models = {}
    for mode in ("clip", "movie"):
      base = model.model_for([{"video_mode": mode}])
      self._models[mode] = base.clone(cfg=dataclasses.replace(base.cfg, dtype=model.dtype))
    self._decode_model = self._models[model.cfg.video_mode]
    # decode spans: a dispatch attends over the first `span` slots, the smallest of these
    # that the rows in use fit (`_span`), so its cost follows the longest live row, not
    # max_positions; all are compiled at start
    self.spans = decode_spans(max_positions)
    self._decode_jit, self._admit_jit = _decode_jit, _admit_jit
    # a chunked prefill's stage: whole chunks of slots, so no chunk's write is clamped
    self._stage_len = -(-max_positions // prefill_chunk) * prefill_chunk if prefill_chunk else 0
    self._filling: _Filling | None = None   # the request being prefilled chunk by chunk
    self._prefill_alone = 0   # after a group's prefill failed: its requests are prefilled one at a time
    self._state_spec = None   # the state's abstract shapes, once started
    self._compile_lock = threading.Lock()
    self._compiled: set = set()   # (shape, group size) (chunked: shape) a submitting thread compiled
    # requests of each prefill shape submitted and not yet prefilled (nor ended): a group
    # of k can form only once k of them wait, and the k-th compiles its size before it queues
    self._waiting: collections.Counter = collections.Counter()
    self._state = self._init_state()
    self._rows: list[Handle | None] = [None] * slots
    self._queue: collections.deque[Handle] = collections.deque()
    self._cv = threading.Condition()
    self._ids = itertools.count()
    self._stop = False
    self.shapes: set = set()          # distinct compiled shapes (one compile each)
    self.steps = 0                    # decode steps run
    self.busy_row_steps = 0           # sum over steps of the rows in use
    self.generated_tokens = 0
    self.finished: collections.Counter = collections.Counter()   # finish_reason -> requests
    self.ttft: collections.deque = collections.deque(maxlen=4096)  # seconds, submit -> first token
    self.ttft_sum, self.ttft_count = 0.0, 0
    self._rate: collections.deque = collections.deque(maxlen=2048)   # (time, generated_tokens) after each step
    self.error: BaseException | None = None   # what stopped the loop, if anything did
    self._thread = threading.Thread(target=self._loop, name="llamavid-engine", daemon=True)
    if start:
      self.start()

  # --- state ------------------------------------------------------------------------
  def _init_state(self) -> dict:
    llm = self.m.cfg.llm
    b, t = self.slots, self.max_positions
    kv = {n: jnp.zeros(a.shape, a.dtype) for n, a in cache_spec(llm, b, t, self.m.dtype, self.m.cfg.kv_cache).items()}
    cache = dict(kv, valid=jnp.zeros((b, t), bool),
                 index=jnp.zeros((b,), jnp.int32), pos=jnp.zeros((b,), jnp.int32))
    return dict(cache=cache, logits=jnp.zeros((b, llm.vocab_size), jnp.float32), done=jnp.ones((b,), bool),
                step=jnp.zeros((b,), jnp.int32), key=jnp.zeros((b, 2), jnp.uint32),
                temperature=jnp.zeros((b,), jnp.float32), top_p=jnp.ones((b,), jnp.float32))

  @property
  def compiles(self) -> int:
    return len(self.shapes)

  @property
  def slots_in_use(self) -> int:
    return sum(r is not None for r in self._rows)

  @property
  def queue_depth(self) -> int:
    return len(self._queue)

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self.error is None

  def start(self) -> None:
    """Compiles the decode step of every span (no row is in use: nothing is decoded),
    then starts the step loop."""
    for span in self.spans:
      self._run_decode(span)
    # the state's shapes never change (nor its placement: never put anywhere, as a call
    # without shardings sees it): what `_compile_ahead` lowers against
    self._state_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self._state)
    self._thread.start()

  def _compile_ahead(self, shape: tuple, batch: dict, positions: int, waiting: int) -> None:
    """Compiles, in the submitting thread, what a request of `shape` can run that is not
    compiled yet, so that the engine's thread only runs compiled programs: its prefill at
    every group size `_admit_waiting` can form of the `waiting` requests of that shape
    (it among them; the powers of two up to prefill_batch and the slots), or, with
    prefill_chunk, its stage, each chunk size its prompt takes and the install. (XLA:CPU
    compiles on the engine's thread, beside the caller's own, aborted the process now and
    then in the test suite, in compiling and in writing the persistent compile cache.) A
    shape the model refuses is left to the engine, which gives that request its error."""
    if self._state_spec is None:
      return
    sizes = _group_sizes(min(self.prefill_batch, self.slots, waiting))
    if (shape in self._compiled if self.prefill_chunk else all((shape, k) in self._compiled for k in sizes)):
      return   # compiled: no wait behind another shape's compile
    with self._compile_lock:
      try:
        if self.prefill_chunk:
          if shape not in self._compiled:
            self._compile_chunked(shape, batch, positions)
            self._compiled.add(shape)
          return
        length = min(self.max_positions, gen.bucket(positions))
        for k in sizes:
          if (shape, k) in self._compiled:
            continue
          rows = lambda dtype, *dims: jax.ShapeDtypeStruct((k,) + dims, dtype)   # noqa: B023, E731
          group = {n: jax.ShapeDtypeStruct((k,) + v.shape[1:], v.dtype) for n, v in batch.items()}
          self._admit_jit.lower(self._models[shape[0]], self.m.params, self._state_spec, group, rows(np.int32),
                                rows(np.uint32), rows(np.float32), rows(np.float32), length).compile()
          self._compiled.add((shape, k))
      except Exception:   # noqa: BLE001  the engine's own prefill meets the same error and gives it to the request
        return

  def _compile_chunked(self, shape: tuple, batch: dict, positions: int) -> None:
    """A chunked prefill's programs for one shape: its stage, a fill of each chunk size
    its prompt takes (`_prefill_chunks`'s sizes) and the install into a row."""
    model, params = self._models[shape[0]], self.m.params
    _stage_jit.lower(model, params, batch, self._stage_len).compile()
    stage = jax.eval_shape(lambda p, b: _stage(model, p, b, self._stage_len), params, batch)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)   # noqa: E731
    start, sizes = 0, set()
    while start < positions:
      size = self._chunk(positions - start)
      sizes.add(size)
      start += size
    for size in sorted(sizes):
      _fill_jit.lower(self._decode_model, params, stage, scalar(np.int32), size).compile()
    _install_jit.lower(self._state_spec, stage, scalar(np.int32), scalar(np.uint32),
                       scalar(np.float32), scalar(np.float32), self.max_positions).compile()

  def close(self, timeout: float = 30.0) -> None:
    """Stops the loop; requests still queued or running end with EngineStopped."""
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    if self._thread.is_alive():
      self._thread.join(timeout)
    for h in self._handles():
      h._finish(None, EngineStopped("the engine stopped"))
    self._queue.clear()
    self._rows, self._filling = [None] * self.slots, None

  def _handles(self) -> list[Handle]:
    """Every request not ended: queued, being prefilled, decoding."""
    filling = [self._filling.h] if self._filling is not None else []
    return list(self._queue) + filling + [r for r in self._rows if r is not None]

  # --- requests ---------------------------------------------------------------------
  def batch(self, request: dict) -> dict:
    """One request (`inference.Model.request`) -> its prefill batch (a batch of one, bucketed)."""
    return gen.batch_requests([request], pad_id=self.m.tokenizer.pad_token_id, **self.buckets)

  def positions(self, request: dict, batch: dict | None = None) -> int:
    """Cache slots the request's prompt takes (spliced, in its text and frame buckets)."""
    model = self._models[request.get("video_mode", "clip")]
    batch = self.batch(request) if batch is None else batch
    return batch_spliced_length(batch, model.cfg.tokens_per_frame, movie=model.cfg.movie)

  def check(self, request: dict, max_tokens: int, batch: dict | None = None) -> int:
    """Raises RequestTooLarge unless the prompt and `max_tokens` fit a slot -> prompt positions."""
    n = self.positions(request, batch)
    room = self.max_positions - n
    if room < 1:
      raise RequestTooLarge("messages", f"the prompt takes {n} positions (text and visual tokens, bucketed); "
                            f"a slot holds {self.max_positions}")
    if max_tokens > room:
      raise RequestTooLarge("max_tokens", f"max_tokens {max_tokens} does not fit: the prompt takes {n} of the "
                            f"slot's {self.max_positions} positions, leaving {room}")
    return n

  def submit(self, request: dict, sampling: Sampling,
             on_event: Callable[[str, object], None] | None = None) -> Handle:
    """Queues a request -> its Handle. Raises RequestTooLarge (prompt + budget exceed a
    slot), QueueFull, EngineStopped. `on_event(kind, payload)` is called from the
    engine's thread for each event: ("delta", str), ("done", Completion), ("error", exc)."""
    if sampling.max_tokens < 1:
      raise RequestTooLarge("max_tokens", f"max_tokens must be >= 1, got {sampling.max_tokens}")
    batch = self.batch(request)   # here, in the caller's thread: the engine's thread only runs the model
    n = self.check(request, sampling.max_tokens, batch)
    shape = (request.get("video_mode", "clip"),) + tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
    with self._cv:
      self._waiting[shape] += 1
      waiting = self._waiting[shape]
    queued = False
    try:
      self._compile_ahead(shape, batch, n, waiting)   # here, not on the engine's thread (see there)
      with self._cv:
        if self._stop or not self.alive:
          raise EngineStopped("the engine is not running" + (f": {self.error!r}" if self.error else ""))
        if len(self._queue) >= self.max_queue:
          raise QueueFull(f"{len(self._queue)} requests are queued (max_queue {self.max_queue})")
        h = Handle(next(self._ids), request, sampling, n, on_event)
        h.batch, h.shape, h.waiting = batch, shape, True
        self._queue.append(h)
        queued = True
        self._cv.notify_all()
    finally:
      if not queued:
        self._unwait(shape)
    return h

  def _unwait(self, shape: tuple) -> None:
    """One request of `shape` no longer waits for its prefill (`_waiting`)."""
    with self._cv:
      self._waiting[shape] -= 1
      if not self._waiting[shape]:
        del self._waiting[shape]

  def _settle(self, *hs: Handle) -> None:
    """These requests no longer wait for their prefill (prefilled, or ended in the queue)."""
    for h in hs:
      if h.waiting:
        h.waiting = False
        self._unwait(h.shape)

  # --- the loop ---------------------------------------------------------------------
  def _loop(self) -> None:
    try:
      while True:
        with self._cv:
          while not self._stop and not self._queue and self._filling is None and all(r is None for r in self._rows):
            self._cv.wait()
          if self._stop:
            return
        self._free_cancelled()
        self._drop_cancelled()
        if self.prefill_chunk:
          self._prefill_chunks()
        else:
          self._admit_waiting()
        if any(r is not None for r in self._rows):
          self._step()
    except BaseException as e:   # a bug, not a bad request (those fail alone): every request learns of it
      self.error = e
      traceback.print_exc()
      with self._cv:
        self._stop = True
      for h in self._handles():
        h._finish(None, EngineStopped(f"the engine's loop failed: {e!r}"))

  def _free_cancelled(self) -> None:
    for i, h in enumerate(self._rows):
      if h is not None and h.cancelled:
        self._end(i, "cancelled")

  def _drop_cancelled(self) -> None:
    with self._cv:
      gone = [h for h in self._queue if h.cancelled]
      for h in gone:
        self._queue.remove(h)
    self._settle(*gone)
    for h in gone:
      self.finished["cancelled"] += 1
      h._finish(self._completion(h, "cancelled"))

  def _pop_queued(self) -> Handle | None:
    """The next queued request not cancelled (those before it end), or None."""
    while True:
      with self._cv:
        if not self._queue:
          return None
        h = self._queue.popleft()
      if not h.cancelled:
        return h
      self._settle(h)
      h._finish(self._completion(h, "cancelled"))
      self.finished["cancelled"] += 1

  def _admit_waiting(self) -> None:
    while None in self._rows:
      h = self._pop_queued()
      if h is None:
        return
      free = [i for i, r in enumerate(self._rows) if r is None]
      group = [h] + self._pop_alike(h, min(len(free), self.prefill_batch) - 1)
      k = 1 << (len(group).bit_length() - 1)   # a power of two: a bounded number of prefill compiles
      with self._cv:
        self._queue.extendleft(reversed(group[k:]))   # the rest wait at the front, in order
      group = group[:k]
      try:
        self._prefill(group, free[:k])
      except Exception as e:   # a shape the model refuses: the request fails alone (a group: each alone)
        if k > 1:
          with self._cv:
            self._queue.extendleft(reversed(group))
          self._prefill_alone = len(group)
          continue
        self._settle(h)
        h._finish(None, e)
        self.finished["error"] += 1
        continue
      for g, row in zip(group, free):
        self._rows[row] = g

  def _pop_alike(self, h: Handle, n: int) -> list[Handle]:
    """Up to n queued requests (in order, not cancelled) of h's prefill shape, taken off the queue."""
    if n < 1 or self._prefill_alone:
      self._prefill_alone = max(self._prefill_alone - 1, 0)
      return []
    with self._cv:
      alike = [q for q in self._queue if q.shape == h.shape and not q.cancelled][:n]
      for q in alike:
        self._queue.remove(q)
    return alike

  def _prefill(self, group: list[Handle], rows: list[int]) -> None:
    """Prefills the requests of one shape into their rows, in one dispatch."""
    h = group[0]
    mode, k = h.request.get("video_mode", "clip"), len(group)
    batch = h.batch if k == 1 else {n: np.concatenate([g.batch[n] for g in group]) for n in h.batch}
    self.shapes.add(("prefill", k) + h.shape)
    seeds = np.asarray([_seed32(g.sampling.seed) for g in group], np.uint32)
    temps = np.asarray([g.sampling.temperature for g in group], np.float32)
    top_ps = np.asarray([g.sampling.top_p for g in group], np.float32)
    length = min(self.max_positions, gen.bucket(h.positions))   # the rows' slots their prompts fill
    with self._memory("the engine's prefill"):
      self._state, n = self._admit_jit(self._models[mode], self.m.params, self._state, batch,
                                       np.asarray(rows, np.int32), seeds, temps, top_ps, length)
    self._settle(*group)
    now = time.monotonic()
    for i, (g, row) in enumerate(zip(group, rows)):
      g.prompt_tokens, g.slot = (n, i), row   # a device array, read when the request ends: no wait here
      g.started, g.start_step = now, self.steps

  # --- chunked prefill --------------------------------------------------------------
  def _prefill_chunks(self) -> None:
    """Prefill work of one loop turn: chunks of at most `prefill_chunk` positions in all,
    of the request being prefilled and then of the next queued ones while rows are free
    (a request installed in its row after its last chunk). A long prompt thus takes one
    chunk per turn, and the running rows decode between its chunks."""
    budget = self.prefill_chunk
    while True:
      f = self._filling
      if f is not None and f.h.cancelled:
        self._filling = None
        self.finished["cancelled"] += 1
        f.h._finish(self._completion(f.h, "cancelled"))
        continue
      if f is None:
        if None not in self._rows:
          return
        h = self._pop_queued()
        if h is None:
          return
      size = self._chunk((f.h.positions - f.start) if f else h.positions)
      if size > budget:
        if f is None:   # it starts next turn
          with self._cv:
            self._queue.appendleft(h)
        return
      try:
        f = f or self._begin(h)
        self._fill_chunk(f, size)
        if f.start >= f.h.positions:
          self._install(f)
      except Exception as e:   # this request's failure (a shape the model refuses): it alone ends
        self._filling = None
        self._settle(f.h if f else h)
        (f.h if f else h)._finish(None, e)
        self.finished["error"] += 1
      budget -= size

  def _chunk(self, left: int) -> int:
    """The next chunk's size for a prompt with `left` positions still to fill: C, or the
    power of two that covers what is left."""
    return min(self.prefill_chunk, gen.bucket(left))

  def _begin(self, h: Handle) -> "_Filling":
    """Embeds the request's prompt into a stage (`_stage`) -> it, the one being filled."""
    mode, batch = h.request.get("video_mode", "clip"), h.batch
    self._settle(h)
    self.shapes.add(("stage", self._stage_len) + h.shape)
    self._filling = _Filling(h, _stage_jit(self._models[mode], self.m.params, batch, self._stage_len))
    return self._filling

  def _fill_chunk(self, f: "_Filling", size: int) -> None:
    self.shapes.add(("fill", size, self._stage_len))
    f.stage = _fill_jit(self._decode_model, self.m.params, f.stage, jnp.int32(f.start), size)
    f.start += size
    f.h.prefill_steps.append(self.steps)

  def _install(self, f: "_Filling") -> None:
    """The filled stage into a free row: the request decodes from the next step on."""
    h, s = f.h, f.h.sampling
    row = self._rows.index(None)
    self.shapes.add(("install", self._stage_len, self.max_positions))
    h.prompt_tokens = (f.stage["pos"], 0)   # read when the request ends
    self._state = _install_jit(self._state, f.stage, jnp.int32(row), _seed32(s.seed), jnp.float32(s.temperature),
                               jnp.float32(s.top_p), self.max_positions)
    self._filling = None
    h.slot, h.started, h.start_step = row, time.monotonic(), self.steps
    self._rows[row] = h

  def _span(self) -> int:
    """The smallest span that holds every row in use after this dispatch: a row's next
    slot is its prompt's positions plus the steps decoded since it started."""
    ends = [h.positions + self.steps - h.start_step for h in self._rows if h is not None]
    need = max(ends, default=0) + self.decode_chunk
    return next((s for s in self.spans if s >= need), self.max_positions)

  def _run_decode(self, span: int | None = None) -> np.ndarray:
    span = self._span() if span is None else span
    self.shapes.add(("decode", self.slots, self.max_positions, self.decode_chunk, span))
    with self._memory("the engine's decode step"):
      self._state, toks = self._decode_jit(self._decode_model, self.m.params, self._state, self.decode_chunk,
                                           self.eos_id, span)
      return np.asarray(toks)

  def _memory(self, what: str):
    """An out-of-device-memory error in `what` names the plan of `slots` rows of
    `max_positions` (validation.device_memory)."""
    return validation.device_memory(what, ckpt=self.m.ckpt, seq_len=self.max_positions, new_tokens=0, quant=self.m.quant,
                                    rows=self.slots, dtype=self.m.dtype, kv_cache=self.m.cfg.kv_cache)

  def _step(self) -> None:
    toks = self._run_decode()
    busy = [i for i, h in enumerate(self._rows) if h is not None]
    self.steps += self.decode_chunk
    self.busy_row_steps += len(busy) * self.decode_chunk
    for i in busy:
      h = self._rows[i]
      try:
        reason = self._take(h, toks[i].tolist())
      except Exception as e:   # decoding this row's text failed: it alone ends
        self._rows[i] = None
        h._finish(None, e)
        self.finished["error"] += 1
        continue
      if reason is not None:
        self._end(i, reason)
    self._rate.append((time.monotonic(), self.generated_tokens))

  def _take(self, h: Handle, toks: list[int]) -> str | None:
    """Appends a row's new tokens to its request, emits the new text -> the finish
    reason once it ended, else None."""
    budget, eos = h.sampling.max_tokens, False
    for t in toks:
      if len(h.ids) >= budget:
        break
      h.ids.append(int(t))
      self.generated_tokens += 1
      if h.first_token is None:
        h.first_token = time.monotonic()
        self.ttft.append(h.first_token - h.submitted)
        self.ttft_sum += h.first_token - h.submitted
        self.ttft_count += 1
      if t == self.eos_id:
        eos = True
        break
    stop = h.sampling.stop
    with self.tokenizer_lock:
      text = self.m.tokenizer.decode(h.ids[:len(h.ids) - eos], skip_special_tokens=True).strip()
      cut = any(s and s in text for s in stop)
      done = eos or cut or len(h.ids) >= budget
      if done:
        text = self.m.answer(h.ids, stop).text
      else:
        hold = max((len(s) for s in stop if s), default=1) - 1   # a stop string may be starting
        text = text[:len(text) - hold] if hold else text
        text = text.rstrip()
    if (done or "\ufffd" not in text[len(h.shown):]) and text.startswith(h.shown) and len(text) > len(h.shown):
      h._emit("delta", text[len(h.shown):])
      h.shown = text
    if not done:
      return None
    return "stop" if eos or cut else "length"

  def _completion(self, h: Handle, reason: str) -> Completion:
    with self.tokenizer_lock:
      ans = self.m.answer(h.ids, h.sampling.stop)
    n, i = h.prompt_tokens
    return Completion(ans.text, ans.token_ids, reason, int(np.asarray(n)[i]) if np.ndim(n) else int(n), len(h.ids))

  def _end(self, row: int, reason: str) -> None:
    h = self._rows[row]
    h.finish_step = self.steps
    self.finished[reason] += 1   # counted before the row is free: a reader who sees the slot free sees the count
    self._rows[row] = None
    h._finish(self._completion(h, reason))

  # --- figures ----------------------------------------------------------------------
  def tokens_per_second(self, window: float = 10.0) -> float:
    """Generated tokens per second over the last `window` seconds (0 when idle): between
    the last step before the window (or its first step) and now."""
    now, rate = time.monotonic(), list(self._rate)
    older = [(t, n) for t, n in rate if now - t > window]
    base = older[-1] if older else (rate[0] if rate else None)
    if base is None or rate[-1][1] == base[1]:
      return 0.0
    return (rate[-1][1] - base[1]) / max(now - base[0], 1e-9)

  def stats(self) -> dict:
    """Counters and gauges for /metrics."""
    ttft = sorted(self.ttft)
    q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else float("nan")
    return dict(queue_depth=self.queue_depth, slots=self.slots, slots_in_use=self.slots_in_use,
                generated_tokens=self.generated_tokens, decode_steps=self.steps, busy_row_steps=self.busy_row_steps,
                compiles=self.compiles, finished=dict(self.finished),
                ttft_quantiles={p: q(p) for p in (0.5, 0.9, 0.99)},
                ttft_sum=self.ttft_sum, ttft_count=self.ttft_count, alive=self.alive,
                tokens_per_second=self.tokens_per_second())
