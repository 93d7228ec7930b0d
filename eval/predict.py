"""Benchmark Items -> answers with a loaded model, on the serving engine.

  p = Predictor(inference.load(ckpt), batch_size=8, max_new_tokens=64, temperature=0.0)
  texts = p.predict(items)            # one answer per `eval.benchmarks.common.Item`
  p.close()                           # the engine's thread and KV cache

Each Item's media (video at 1 fps, image, feature file, or none) is read on the host,
its prompt becomes the release's single-turn inference prompt (`<image>\\n` + prompt,
`llamavid_jax/inference.py`) with the Item's `instruction` as the Q-Former text, and
`batch_size` Items at a time are submitted to the continuous-batching engine
(`llamavid_jax/engine.py`, `batch_size` slots: the one generation loop of eval.chat,
eval.web and eval.serve), whose answers are those of `Model.generate` of each Item
alone, greedy or sampled; an answer that ends (</s>, a stop string) frees its slot at
once. The engine's cache holds a power of two of positions a slot, enough for the
batch's longest prompt and the budget; a batch that needs more makes it again (at most
log2 sizes). Prompt lengths and frame counts are rounded up to powers of two
(`generate.batch_requests`), so a benchmark compiles once per (text bucket, frame
bucket), not once per question.
An Item whose media cannot be read (`inference.MediaError`) gets None and a warning
naming the file; the runner counts it as failed and retries it on the next run.
"""

from __future__ import annotations

import logging
from typing import Sequence

from llamavid_jax import engine as engine_lib
from llamavid_jax import inference, validation

log = logging.getLogger("eval.predict")


class Predictor:
  def __init__(self, model: inference.Model, *, batch_size: int = 1, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, prefill_chunk: int = 0,
               stop: Sequence[str] = (), fit_max_new_tokens: bool = False):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    validation.raise_all(validation.check_sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                                   prefill_chunk=prefill_chunk, prefix=""))
    self.model, self.batch_size = model, batch_size
    self.problems: list[str] = []
    self.fit = fit_max_new_tokens   # a default (the benchmark's): cut to what the positions leave
    self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   prefill_chunk=prefill_chunk, stop=tuple(stop))
    self.engine: engine_lib.Engine | None = None

  def engine_for(self, need: int) -> engine_lib.Engine:
    """The engine (`batch_size` slots), made (again) with the power of two of positions a
    slot >= `need` when it is missing or holds fewer."""
    if self.engine is not None and self.engine.max_positions >= need:
      return self.engine
    self.close()
    self.engine = engine_lib.Engine(self.model, slots=self.batch_size, max_positions=1 << max(need - 1, 1).bit_length(),
                                    decode_chunk=8, max_queue=self.batch_size, prefill_chunk=self.kw["prefill_chunk"])
    return self.engine

  def close(self) -> None:
    """Stops the engine (its thread, its KV cache); a later `predict` makes another."""
    if self.engine is not None:
      self.engine.close()
      self.engine = None

  def answers(self, requests: list[dict], max_new_tokens: int) -> list[str]:
    """Requests -> their answers' texts, all submitted to the engine at once."""
    kw = self.kw
    need = max(engine_lib.prompt_positions(self.model, r) for r in requests) + max_new_tokens
    eng = self.engine_for(need)
    sampling = engine_lib.Sampling(max_tokens=max_new_tokens, temperature=kw["temperature"], top_p=kw["top_p"],
                                   seed=kw["seed"], stop=kw["stop"])
    handles = [eng.submit(r, sampling) for r in requests]
    return [h.result().text for h in handles]

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

  def predict(self, items) -> list[str | None]:
    """Items -> answers, `batch_size` at a time (the last batch may be smaller); None
    for an item whose media cannot be read (logged with the file and why)."""
    out: list[str | None] = []
    for i in range(0, len(items), self.batch_size):
      batch = items[i:i + self.batch_size]
      reqs: list[dict | None] = []
      for it in batch:
        try:
          req = self.request(it)
          self.model.check_request(req, 1 if self.fit else self.kw["max_new_tokens"], what=f"item {it.id}")
          reqs.append(req)
        except (inference.MediaError, validation.BudgetError) as e:   # failed, named, the run goes on
          self.problem(f"{it.id}: {e}")
          reqs.append(None)
      ok = [r for r in reqs if r is not None]
      budget = self.kw["max_new_tokens"]
      if self.fit and ok:
        budget = min([budget] + [self.model.room(r) for r in ok])
      texts = iter(self.answers(ok, budget) if ok else [])
      out += [None if r is None else next(texts) for r in reqs]
    return out
