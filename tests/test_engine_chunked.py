"""The engine's chunked prefill (`Engine(prefill_chunk=C)`): a long prompt prefilled C
positions per dispatch while another request decodes gets exactly its one-at-a-time
greedy tokens, and so does the decoding one; the running request receives tokens
between the long prompt's chunks (the engine's step counters); chunk shapes are
powers of two up to C (a bounded number of compiles). Batched prefill
(`Engine(prefill_batch=K)`): queued requests of one shape prefill together, each with its
tokens alone."""

import pytest

from llamavid_jax import engine as engine_lib
from llamavid_jax import generate as gen
from llamavid_jax import inference

NEW, C, DECODE = 16, 16, 2


def chunks(n: int) -> list[int]:
  """The chunk sizes of an n-position prompt: C each, the rest in a power of two."""
  return [C] * (n // C) + ([gen.bucket(n % C)] if n % C else [])


@pytest.fixture(scope="module")
def model(tiny_ckpt):
  return inference.load(tiny_ckpt)


@pytest.fixture(scope="module")
def reqs(model, clip28):
  """A short text-only request (32 positions: two chunks) and a long one with a video
  (its spliced prompt some 70 positions: five chunks), with their one-at-a-time tokens."""
  short = model.request("Describe it.", None)
  long = model.request("Hello What is this?", model.media(video=clip28))
  want = [model.generate([r], max_new_tokens=NEW)[0].token_ids for r in (short, long)]
  assert len(want[0]) == NEW   # no eos: the short one decodes its whole budget
  return short, long, want


@pytest.mark.slow
def test_a_long_prompt_prefilled_in_chunks_while_another_decodes(model, reqs, monkeypatch):
  short, long, want = reqs
  eng = engine_lib.Engine(model, slots=2, max_positions=128, decode_chunk=DECODE, prefill_chunk=C)
  try:
    events, late, step, fill, take = [], [], eng._step, eng._fill_chunk, eng._take
    first = {}

    def step_then_arrive():   # the long request arrives after the short one's first decode dispatch
      step()
      if not late:
        late.append(eng.submit(long, engine_lib.Sampling(max_tokens=NEW)))

    def fill_logged(f, size):
      fill(f, size)
      events.append(("chunk", f.h.id, size, eng.steps))

    def take_logged(h, toks):
      events.append(("tokens", h.id, len(toks), eng.steps))
      return take(h, toks)

    monkeypatch.setattr(eng, "_step", step_then_arrive)
    monkeypatch.setattr(eng, "_fill_chunk", fill_logged)
    monkeypatch.setattr(eng, "_take", take_logged)
    h = eng.submit(short, engine_lib.Sampling(max_tokens=NEW))
    first["short"] = h
    assert h.result(120).token_ids == want[0]
    [hl] = late
    assert hl.result(120).token_ids == want[1]
  finally:
    eng.close()
  n, n_short = eng.positions(long), eng.positions(short)
  sizes = [e[2] for e in events if e[:2] == ("chunk", hl.id)]
  assert n > 4 * C and sizes == chunks(n)
  assert [e[2] for e in events if e[:2] == ("chunk", h.id)] == chunks(n_short)
  # between every two chunks of the long prompt, one decode dispatch of the short request
  order = [e for e in events if e[:2] in (("chunk", hl.id), ("tokens", h.id))]
  first_chunk = order.index(("chunk", hl.id, C, DECODE))
  chunks_and_tokens = [e[0] for e in order[first_chunk:first_chunk + 2 * len(sizes)]]
  assert chunks_and_tokens == ["chunk", "tokens"] * len(sizes)
  assert hl.prefill_steps == [DECODE * (k + 1) for k in range(len(sizes))]   # decode steps run before each chunk
  assert h.start_step == 0 and hl.start_step == hl.prefill_steps[-1] and h.finish_step > hl.start_step
  # compiles: the decode step per span (64, 128), one stage per (text, frame) bucket, a
  # chunk step per size, one install
  fills = {k[1] for k in eng.shapes if k[0] == "fill"}
  assert fills == set(chunks(n) + chunks(n_short)) and all(s <= C and s & (s - 1) == 0 for s in fills)
  assert sorted(k[0] for k in eng.shapes if k[0] not in ("fill", "decode")) == ["install", "stage", "stage"]
  assert {k[-1] for k in eng.shapes if k[0] == "decode"} == set(eng.spans) == {64, 128}


def test_a_request_cancelled_while_it_is_prefilled_ends_and_the_engine_goes_on(model, reqs, monkeypatch):
  short, long, want = reqs
  eng = engine_lib.Engine(model, slots=1, max_positions=128, decode_chunk=DECODE, prefill_chunk=C)
  try:
    fill = eng._fill_chunk

    def fill_then_cancel(f, size):
      fill(f, size)
      if f.h.request is long:
        f.h.cancel()

    monkeypatch.setattr(eng, "_fill_chunk", fill_then_cancel)
    hl = eng.submit(long, engine_lib.Sampling(max_tokens=NEW))
    done = hl.result(120)
    assert (done.finish_reason, done.token_ids, len(hl.prefill_steps)) == ("cancelled", [], 1)
    assert eng.submit(short, engine_lib.Sampling(max_tokens=NEW)).result(120).token_ids == want[0]
    assert eng.finished == {"cancelled": 1, "length": 1} and eng.slots_in_use == 0
  finally:
    eng.close()


def test_a_row_that_outgrows_its_decode_span_moves_to_the_next(model, reqs, monkeypatch):
  """Decode spans (`Engine.spans`, 64 and 128 here): a dispatch attends over the first
  span slots that hold the rows in use; an answer that grows past 64 slots moves to 128
  between dispatches and keeps its one-at-a-time greedy tokens (its prompt prefilled into
  a 64-slot cache, the rest of its row masked)."""
  short, _, _ = reqs
  budget = 48
  [want] = model.generate([short], max_new_tokens=budget)
  eng = engine_lib.Engine(model, slots=2, max_positions=128, decode_chunk=DECODE)
  spans, span = [], eng._span
  monkeypatch.setattr(eng, "_span", lambda: spans.append(span()) or spans[-1])
  try:
    got = eng.submit(short, engine_lib.Sampling(max_tokens=budget)).result(120)
  finally:
    eng.close()
  assert got.token_ids == want.token_ids
  assert eng.positions(short) + len(want.token_ids) > 64   # the answer outgrew the first span
  assert eng.spans == [64, 128] and spans[0] == 64 and spans[-1] == 128 and spans == sorted(spans)


@pytest.mark.slow   # seven references and five prefill group compiles
def test_queued_requests_of_one_shape_are_prefilled_together_with_their_own_tokens(model, clip28):
  """Seven requests queued at once (the engine's lock held while they are submitted):
  five of one prefill shape (a clip, questions in one text bucket; greedy and sampled,
  other budgets) and two text-only ones. The five go in a batch of 4 and one alone (a
  power of two), the two in a batch of 2; every request gets `Model.generate`'s tokens
  alone, with its own sampling."""
  media = model.media(video=clip28)
  asks = [("What is this?", media, dict()), ("Describe it.", media, dict(temperature=0.9, top_p=0.8, seed=3)),
          ("Describe this.", media, dict()), ("What is this?", media, dict(temperature=0.7, top_p=1.0, seed=1)),
          ("Describe it.", media, dict()), ("What is this?", None, dict()),
          ("Describe it.", None, dict(temperature=0.9, top_p=0.7, seed=2))]
  budgets = [NEW, 6, 9, NEW, 3, NEW, 7]
  reqs = [model.request(q, m) for q, m, _ in asks]
  want = [model.generate([r], max_new_tokens=n, **kw)[0].token_ids for r, (_, _, kw), n in zip(reqs, asks, budgets)]
  eng = engine_lib.Engine(model, slots=8, max_positions=128, decode_chunk=DECODE, prefill_batch=8)
  try:
    shapes = [eng.batch(r) for r in reqs]
    key = lambda b: tuple((k, v.shape) for k, v in sorted(b.items()))   # noqa: E731
    assert len({key(b) for b in shapes[:5]}) == 1 and len({key(b) for b in shapes}) == 2   # two shapes
    with eng._cv:   # the engine's thread waits for the lock: it finds all seven queued
      hs = [eng.submit(r, engine_lib.Sampling(max_tokens=n, **kw)) for r, (_, _, kw), n in zip(reqs, asks, budgets)]
    assert [h.result(120).token_ids for h in hs] == want
  finally:
    eng.close()
  prefills = sorted(k[1] for k in eng.shapes if k[0] == "prefill")
  assert prefills == [1, 2, 4]
  # compiled ahead: the group sizes each shape's waiting requests could form (5: 1, 2, 4;
  # 2: 1, 2), not every size up to prefill_batch 8
  assert sorted(k for _, k in eng._compiled) == [1, 1, 2, 2, 4]
  assert [h.slot for h in hs[:4]] == [0, 1, 2, 3] and len({h.started for h in hs[:4]}) == 1   # one dispatch
  # each row's prompt count is its own: its text, less the image placeholder, and 2 tokens a frame
  n_frames = media.num_frames
  assert [h.result().prompt_tokens for h in hs] == [
      len(r["input_ids"]) + (model.cfg.tokens_per_frame * n_frames - 1 if m else 0) for r, (_, m, _) in zip(reqs, asks)]


@pytest.mark.parametrize("kw", [dict(prefill_chunk=C), dict(prefill_batch=2)], ids=["chunked", "batched"])
def test_the_engines_thread_compiles_nothing(model, reqs, kw):
  """Everything a request runs (its prefill, every group size of its shape, or its stage,
  chunks and install) is compiled ahead in the submitting thread: the engine's thread
  (`llamavid-engine`) meets no compile and no persistent-cache read, and the answers are
  the one-at-a-time tokens. Two requests of one shape at once form a group of 2. A later
  request of a compiled shape is queued while another thread holds the compile lock."""
  import threading

  import jax

  from tests.conftest import COMPILE_EVENTS
  short, long, want = reqs
  threads = []
  listen = lambda name, *a, **k: threads.append(threading.current_thread().name) if name in COMPILE_EVENTS else None
  eng = engine_lib.Engine(model, slots=4, max_positions=128, decode_chunk=DECODE, **kw)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    with eng._cv:   # the engine's thread finds all three queued
      hs = [eng.submit(r, engine_lib.Sampling(max_tokens=NEW)) for r in (short, short, long)]
    assert [h.result(120).token_ids for h in hs] == [want[0], want[0], want[1]]
    # a request of a compiled shape does not wait behind another shape's compile (the lock held here)
    with eng._compile_lock:
      again = []
      t = threading.Thread(target=lambda: again.append(eng.submit(short, engine_lib.Sampling(max_tokens=NEW))))
      t.start()
      t.join(60)
      assert again, "a submit of a compiled shape waited for the compile lock"
    assert again[0].result(120).token_ids == want[0]
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
    eng.close()
  assert threads and "llamavid-engine" not in threads, threads
  if "prefill_batch" in kw:
    # the two short ones together, the long one alone, the later short one alone
    assert sorted(k[1] for k in eng.shapes if k[0] == "prefill") == [1, 1, 2]


def test_a_decode_step_copies_no_cache(model):
  """The compiled decode dispatch (every row at its own slot, a span shorter than the
  cache and the whole cache) writes its rows' new slots in place: no copy or transpose of
  the size of a whole K or V cache (the layers read their slots as values, and the
  stack's new keys and values go in with one scatter). The engine before (the cache a
  scanned input and output of the layer stack, a batch of one vmapped over the rows)
  copied and transposed it several times a step."""
  import re

  eng = engine_lib.Engine(model, slots=4, max_positions=128, decode_chunk=DECODE, start=False)
  k = eng._state["cache"]["k"]
  assert k.shape[0] >= 2   # a layer's slice is smaller than the cache: what the count tells apart
  for span in eng.spans:
    hlo = engine_lib._decode_jit.lower(eng._decode_model, model.params, eng._state, DECODE, eng.eos_id,
                                       span).compile().as_text()
    big = []
    for m in re.finditer(r"(%\S+) = \w+\[([\d,]*)\]\S* (copy|transpose)\(", hlo):
      n = 1
      for d in m.group(2).split(",") if m.group(2) else []:
        n *= int(d)
      if n >= k.size * span // k.shape[2]:
        big.append(m.group(0))
    assert not big, f"span {span}: {big}"
