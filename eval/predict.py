"""Benchmark Items -> answers with a loaded model, through the serving engine.

  with Predictor(inference.load(ckpt), batch_size=8, max_new_tokens=64) as p:
    texts = p.predict(items)          # one answer per `eval.benchmarks.common.Item`

Each Item's media (video at 1 fps, image, feature file, or none) is read on the host,
its prompt becomes the release's single-turn inference prompt (`<image>\\n` + prompt,
`llamavid_jax/inference.py`) with the Item's `instruction` as the Q-Former text, and
the request goes to a continuous-batching engine (`llamavid_jax/engine.py`, the one
generation loop that eval.chat, eval.web and eval.serve run too) of `batch_size` decode
slots: a row that ends frees its slot for the next question at once, so one long
answer no longer holds a whole batch. Items are read at most `2 * batch_size` ahead of
the answer being waited for (the media of a long benchmark is never all in memory), and
answers come back in the items' order. Each request samples with its own key (the
Predictor's seed), so an item's answer is `Model.generate([its request])`'s with the same
arguments, whatever runs beside it. Frames and feature files mix freely.

The engine's cache holds `max_positions` per slot (`slot_positions`): the largest
(prompt positions in the engine's buckets + answer budget) of the items read so far,
rounded up to an eighth of its power of two (a whole power of two would nearly double the
cache's memory for a benchmark whose prompt + 1024-token budget lands just past one; a
decode step's attention reads only the span its rows use, `engine`'s decode spans); it is made before the first request compiles and kept across
`predict` calls while it is large enough (re-made larger, after the answers in flight, when
a later item needs more: at most four sizes an octave). `close()` (or the context manager)
stops it.

`fit_max_new_tokens` (the benchmark default): each item's budget is
min(max_new_tokens, what the model's positions leave after its own prompt). An Item
whose media cannot be read (`inference.MediaError`) or whose prompt does not fit the
model (`validation.BudgetError`) gets None and a warning naming it; the runner counts it
as failed and retries it on the next run.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable, Iterable, Iterator, Sequence

from llamavid_jax import engine as engine_lib
from llamavid_jax import inference, validation

log = logging.getLogger("eval.predict")

Job = Callable[[], "tuple[dict, engine_lib.Sampling]"]   # reads one request (may raise MediaError / BudgetError)
SKIPPED = (inference.MediaError, validation.BudgetError)   # a job's own failure: named, the run goes on


def slot_positions(need: int) -> int:
  """An engine slot's positions for `need`: `need` rounded up to a multiple of an eighth
  of the power of two that covers it, and of 64: few sizes (so few compiles), at most a
  quarter over `need` from 256 on."""
  step = max(1 << max(need - 1, 1).bit_length() >> 3, 64)
  return -(-need // step) * step


class Answerer:
  """Requests -> Completions through one engine of `slots` rows (module docstring): the
  one place where eval.run's Predictor and the lmms-eval adapter generate."""

  def __init__(self, model: inference.Model, *, slots: int = 1, prefill_chunk: int = 0):
    if slots < 1:
      raise ValueError(f"batch_size must be >= 1, got {slots}")
    self.model, self.slots, self.prefill_chunk = model, slots, prefill_chunk
    self.ahead = 2 * slots               # requests read and submitted beyond the answer waited for
    self.engine: engine_lib.Engine | None = None
    self.engines_made = 0

  def close(self) -> None:
    if self.engine is not None:
      self.engine.close()
      self.engine = None

  def need(self, request: dict, sampling: engine_lib.Sampling) -> int:
    """Cache slots a request needs: its prompt's positions (bucketed) + its budget."""
    return engine_lib.prompt_positions(self.model, request) + sampling.max_tokens

  def _engine(self, need: int, pending: collections.deque) -> engine_lib.Engine:
    """The engine, made (again, after the submitted requests end) when it is missing or
    holds fewer than `need` positions a slot."""
    if self.engine is not None and self.engine.max_positions >= need:
      return self.engine
    for cell in pending:   # the answers in flight end on the old engine first
      if cell[0] == "run":
        cell[:] = ["done", cell[1].result()]
    positions = slot_positions(need)
    self.close()
    mib = engine_lib.cache_bytes(self.model.cfg, self.slots, positions, self.model.dtype) / 2 ** 20
    log.info("engine: %d slots x %d positions (%.0f MiB of KV cache)%s", self.slots, positions, mib,
             ", re-made for a longer request" if self.engines_made else "")
    self.engine = engine_lib.Engine(self.model, slots=self.slots, max_positions=positions, max_queue=self.ahead,
                                    prefill_chunk=self.prefill_chunk)
    self.engines_made += 1
    return self.engine

  def complete(self, jobs: Iterable[Job]) -> Iterator[engine_lib.Completion | Exception]:
    """Each job's Completion in the jobs' order, or the MediaError / BudgetError its
    reading raised; jobs are read at most `ahead` before the answer waited for."""
    jobs = iter(jobs)
    pending: collections.deque = collections.deque()   # [state, object]: "new" (request, Sampling),
    more = True                                        # "run" its engine handle, "done" Completion | Exception
    try:
      while more or pending:
        while more and len(pending) < self.ahead:
          job = next(jobs, None)
          if job is None:
            more = False
            break
          try:
            pending.append(["new", job()])
          except SKIPPED as e:
            pending.append(["done", e])
        new = [c for c in pending if c[0] == "new"]
        if new:
          eng = self._engine(max(self.need(*c[1]) for c in new), pending)
          for c in new:
            c[:] = ["run", eng.submit(*c[1])]
        if pending:
          state, obj = pending.popleft()
          yield obj.result() if state == "run" else obj
    finally:   # a caller that stops early (or an error): what it no longer waits for stops too
      for state, obj in pending:
        if state == "run":
          obj.cancel()


class Predictor:
  def __init__(self, model: inference.Model, *, batch_size: int = 1, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, prefill_chunk: int = 0,
               stop: Sequence[str] = (), fit_max_new_tokens: bool = False):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.check_generation([], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           prefill_chunk=prefill_chunk)   # the values, before anything compiles
    self.model, self.batch_size = model, batch_size
    self.problems: list[str] = []
    self.fit = fit_max_new_tokens   # a default (the benchmark's): cut to what the positions leave
    self.max_new_tokens = max_new_tokens
    self.sampling = dict(temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop))
    self.answerer = Answerer(model, slots=batch_size, prefill_chunk=prefill_chunk)

  def close(self) -> None:
    self.answerer.close()

  def __enter__(self) -> "Predictor":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def engine(self) -> engine_lib.Engine | None:
    return self.answerer.engine

  SHOWN = 5   # problems logged one by one; the rest are counted (`summary`)

  def problem(self, text: str) -> None:
    self.problems.append(text)
    if len(self.problems) <= self.SHOWN:
      log.warning("%s", text)
    elif len(self.problems) == self.SHOWN + 1:
      log.warning("more items failed; they are counted and summed up at the end")

  def summary(self) -> str | None:
    """One line over every failed item, or None (nothing failed beyond those logged)."""
    if len(self.problems) <= self.SHOWN:
      return None
    return validation.capped("items failed", self.problems, self.SHOWN)

  def media(self, item) -> inference.Media | None:
    """The Item's media as model input (None for a text-only question)."""
    if item.kind == "none" or item.media is None:
      return None
    if not isinstance(item.media, str):   # an in-memory PIL image (MMBench's decoded base64)
      return self.model.image_media(item.media)
    kind = "image" if item.kind == "image" else inference.media_kind(item.media)
    return self.model.media(**{kind: item.media})

  def request(self, item) -> dict:
    """One Item -> its model request (raises inference.MediaError)."""
    return self.model.request(item.prompt, self.media(item), instruction=item.instruction)

  def requests(self, items) -> list[dict]:
    return [self.request(it) for it in items]

  def budget(self, request: dict, what: str) -> int:
    """The request's answer budget (BudgetError when it does not fit the model's positions)."""
    self.model.check_request(request, 1 if self.fit else self.max_new_tokens, what=what)
    return min(self.max_new_tokens, self.model.room(request)) if self.fit else self.max_new_tokens

  def job(self, item) -> Job:
    def read():
      req = self.request(item)
      return req, engine_lib.Sampling(max_tokens=self.budget(req, f"item {item.id}"), **self.sampling)
    return read

  def answers(self, items) -> Iterator[str | None]:
    """Items -> their answers in order, each as soon as it and those before it are done;
    None for an item whose media cannot be read or does not fit (logged, named)."""
    items = list(items)
    for it, got in zip(items, self.answerer.complete(self.job(it) for it in items)):
      if isinstance(got, Exception):
        self.problem(f"{it.id}: {got}")
        yield None
      else:
        yield got.text

  def predict(self, items) -> list[str | None]:
    """Items -> answers (`answers`), as a list."""
    return list(self.answers(items))
