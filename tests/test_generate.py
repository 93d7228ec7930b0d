"""Generation: left-padded batches, sampling, stop strings, early stop, buckets, streaming, chunked prefill."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from llamavid_jax import generate as G
from llamavid_jax.models import LlamaVid
from tests.conftest import COMPILE_EVENTS

L = 6


def request(cfg, rng, s, t, placeholder=2):
  """One request: s text ids (bos, <image> at `placeholder`), t frames as ViT features."""
  ids = rng.randint(3, cfg.llm.vocab_size, s).astype(np.int32)
  ids[0], ids[placeholder] = 1, cfg.image_token_id
  n1, c = cfg.input_spec.feature_shape
  return dict(input_ids=ids, features=rng.randn(t, n1, c).astype(np.float32),
              qformer_ids=rng.randint(1, cfg.qformer.vocab_size, L).astype(np.int32),
              qformer_mask=np.arange(L) < rng.randint(2, L + 1))


@pytest.fixture(scope="module")
def setup(tiny_cfg):
  rng = np.random.RandomState(0)
  reqs = [request(tiny_cfg, rng, s, t) for s, t in ((5, 3), (9, 1), (7, 2))]
  model = LlamaVid(tiny_cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **G.batch_requests(reqs))["params"])
  return model, params, reqs


def right_padded(batch):
  """The left-padded batch with each row's text moved to the start."""
  out = dict(batch)
  order = np.argsort(~batch["text_mask"], axis=1, kind="stable")
  for k in ("input_ids", "text_mask"):
    out[k] = np.take_along_axis(batch[k], order, 1)
  return out


@pytest.mark.slow
def test_cached_greedy_equals_argmax_of_full_forward_left_padded(setup):
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  assert batch["input_ids"].shape == (3, 16) and batch["frame_mask"].shape == (3, 4)
  assert not batch["text_mask"][:, 0].any() and batch["text_mask"][:, -1].all()    # left padded
  new = np.asarray(G.generate(model, params, batch, max_new_tokens=4, eos_id=-1))
  apply = jax.jit(model.apply)
  for k in range(4):
    full = dict(batch, input_ids=np.concatenate([batch["input_ids"], new[:, :k]], 1),
                text_mask=np.concatenate([batch["text_mask"], np.ones((3, k), bool)], 1))
    logits, out = apply({"params": params}, **full)
    valid = np.asarray(out["layout"].valid)
    last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], 1)            # rows end in unused frame slots
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[np.arange(3), last], -1), new[:, k])


@pytest.mark.slow
def test_batched_equals_one_at_a_time_and_right_padding(setup):
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  got = np.asarray(G.generate(model, params, batch, max_new_tokens=6, eos_id=-1))
  for i, r in enumerate(reqs):
    alone = G.batch_requests([r], text_buckets=[len(r["input_ids"])], frame_buckets=[len(r["features"])])
    np.testing.assert_array_equal(np.asarray(G.generate(model, params, alone, max_new_tokens=6, eos_id=-1))[0],
                                  got[i])
  # the demo's call: right-padded prompts (text_mask cut at the answer) give the same tokens
  right = np.asarray(G.generate(model, params, right_padded(batch), max_new_tokens=6, eos_id=-1))
  np.testing.assert_array_equal(right, got)


def test_eos_ends_a_row(setup):
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  free = np.asarray(G.generate(model, params, batch, max_new_tokens=6, eos_id=-1))
  eos = int(free[0, 2])
  got = np.asarray(G.generate(model, params, batch, max_new_tokens=6, eos_id=eos))
  np.testing.assert_array_equal(got[0], list(free[0, :2]) + [eos] * 4)


def test_decode_chunk_updates_the_donated_cache_in_place(setup):
  """The compiled decode chunk aliases its whole state (logits, cache, done) to its
  output, so one cache is live while decoding, and the state passed in is consumed."""
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  state = G._prefill_jit(model, params, batch, G.prompt_length(model, batch) + 8, 0)
  args = (model, params, state, jax.random.key(0), np.int32(0), 4, -1, 0.0, 0, 1.0)
  mem = G._decode_jit.lower(*args).compile().memory_analysis()
  assert mem.alias_size_in_bytes == sum(a.nbytes for a in jax.tree.leaves(state))
  G._decode_jit(*args)
  assert all(a.is_deleted() for a in jax.tree.leaves(state[1]))


def first_index(rows, tok):
  return [list(r).index(tok) if tok in r else len(r) for r in rows]


@pytest.mark.slow
def test_early_stop_equals_a_full_decode_cut_at_eos(setup, monkeypatch):
  """Rows ending at different steps: decoding stops after the chunk where the last one
  ends, and every row's ids equal the full-length decode's up to its eos (eos after)."""
  model, params, reqs = setup
  batch = G.batch_requests(reqs[:2])
  full = G.generate(model, params, batch, max_new_tokens=40, eos_id=-1)          # 5 chunks of 8, cache grown 3x
  # the eos: a token both rows emit, first at different steps, the later one past the first chunk
  ends, eos = max((first_index(full, t), t) for t in set(full[0]) & set(full[1])
                  if len(set(first_index(full, t))) > 1 and max(first_index(full, t)) < 32)
  assert max(ends) >= 8, ends
  want = np.array([list(r[:e]) + [eos] * (40 - e) for r, e in zip(full, ends)])
  starts = []
  decode = G._decode_jit
  monkeypatch.setattr(G, "_decode_jit", lambda *a: starts.append(int(a[4])) or decode(*a))
  got = G.generate(model, params, batch, max_new_tokens=40, eos_id=eos)
  np.testing.assert_array_equal(got, want)
  assert starts == list(range(0, max(ends) + 1, 8)), (starts, ends)     # stopped after max(ends)'s chunk
  monkeypatch.undo()
  np.testing.assert_array_equal(G.generate(model, params, batch, max_new_tokens=1024, eos_id=eos),
                                np.pad(want, ((0, 0), (0, 1024 - 40)), constant_values=eos))
  # sampled: the same seed gives the same tokens whatever the budget and wherever it stopped
  batch = G.batch_requests(reqs)
  key = jax.random.key(5)
  free = G.generate(model, params, batch, key, max_new_tokens=24, eos_id=-1, temperature=1.0)
  tok = int(free[0, 3])
  stopped = G.generate(model, params, batch, key, max_new_tokens=512, eos_id=tok, temperature=1.0)
  ends = first_index(free, tok)
  assert len(set(ends)) > 1, ends
  for r, s, e in zip(free, stopped, ends):
    np.testing.assert_array_equal(s[:e + 1], r[:e + 1])
    assert (s[e:] == tok).all() or e == 24


@pytest.mark.slow
def test_stop_strings_end_decoding(setup):
  """`ended` (a stop string) ends rows as eos does: decoding stops when every row ended."""
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  full = G.generate(model, params, batch, max_new_tokens=24, eos_id=-1)
  seen = []

  def ended(t):   # row i "says its stop string" at step 3 + i
    seen.append(t.shape[1])
    np.testing.assert_array_equal(t, full[:, :t.shape[1]])
    return t.shape[1] > 3 + np.arange(3)

  got = G.generate(model, params, batch, max_new_tokens=24, eos_id=-1, chunk=2, ended=ended)
  assert seen == [2, 4, 6], seen
  np.testing.assert_array_equal(got[:, :6], full[:, :6])
  assert (got[:, 6:] == -1).all()


class _Chars:
  """A tokenizer stand-in: id i decodes to chr(ord('a') + i % 26)."""

  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_check_reads_text_up_to_eos():
  ended = G.stop_check(_Chars(), eos_id=25, stop=("cd", ""))
  assert ended(np.array([[0, 2, 3, 1], [2, 25, 3, 0], [3, 2, 1, 0]])).tolist() == [True, False, False]
  assert G.stop_check(_Chars(), eos_id=25, stop=("",)) is None


def test_stop_strings_cut_the_answer(tmp_path):
  from transformers import AutoTokenizer
  from tests.data_fixtures import make_llm_tokenizer
  tok = AutoTokenizer.from_pretrained(make_llm_tokenizer(str(tmp_path / "llm")))
  # row 0: "What is this? USER: Hello" </s> "Hi."; row 1 has no eos
  tokens = np.array([[29, 30, 31, 25, 35, 2, 36], [34, 36, 35, 38, 37, 39, 40]])
  assert G.answers(tokens, tok, eos_id=2) == ["What is this? USER: Hello", "Red. Hi. Hello it. Describe dog runs."]
  assert G.answers(tokens, tok, eos_id=2, stop=("USER:", "it.")) == ["What is this?", "Red. Hi. Hello"]
  assert G.answers(tokens, tok, eos_id=-1, stop=("</s>",))[0] == "What is this? USER: Hello Hi."   # decoded skipping specials


@pytest.mark.slow
def test_top_p_to_zero_is_greedy_and_sampling_is_seeded(setup):
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  run = lambda **kw: np.asarray(G.generate(model, params, batch, max_new_tokens=8, eos_id=-1, **kw))
  greedy = run()
  np.testing.assert_array_equal(run(rng=jax.random.key(1), temperature=1.0, top_p=1e-6), greedy)
  np.testing.assert_array_equal(run(rng=jax.random.key(1), temperature=1.0, top_k=1), greedy)
  a = run(rng=jax.random.key(1), temperature=1.0)
  np.testing.assert_array_equal(run(rng=jax.random.key(1), temperature=1.0), a)
  assert not np.array_equal(run(rng=jax.random.key(2), temperature=1.0), a)
  assert not np.array_equal(a, greedy)
  chat = run(rng=jax.random.key(1), **G.CHAT)
  assert ((chat >= 0) & (chat < model.cfg.llm.vocab_size)).all()


def test_sample_top_k_and_top_p_keep_the_right_sets():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  draws = lambda **kw: {int(G.sample(logits, jax.random.key(i), 1.0, **kw)[0]) for i in range(200)}
  assert draws(top_k=2) == {0, 1}
  assert draws(top_p=0.7) == {0, 1}        # 0.5 < 0.7 <= 0.8
  assert draws(top_p=0.85) == {0, 1, 2}
  assert draws() == {0, 1, 2, 3}


@pytest.mark.slow
def test_twenty_requests_compile_once_per_bucket(setup, tiny_cfg):
  model, params, _ = setup
  rng = np.random.RandomState(1)
  compiles = []
  listen = lambda name, secs, **kw: compiles.append(name) if name in COMPILE_EVENTS else None
  jax.monitoring.register_event_duration_secs_listener(listen)
  buckets = set()
  try:
    for _ in range(20):
      r = request(tiny_cfg, rng, rng.randint(3, 30), rng.randint(1, 4))
      batch = G.batch_requests([r], text_buckets=(8, 16, 32), frame_buckets=(2, 4))
      buckets.add((batch["input_ids"].shape[1], batch["frame_mask"].shape[1]))
      G.generate(model, params, batch, max_new_tokens=2, eos_id=-1)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert 1 < len(buckets) <= 6
  assert 0 < len(compiles) <= 2 * len(buckets), (len(compiles), buckets)   # a prefill and a decode chunk


@pytest.mark.slow
def test_stream_equals_generate(setup):
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  for kw in (dict(max_new_tokens=10, chunk=4), dict(max_new_tokens=16, rng=jax.random.key(3), **G.CHAT)):
    chunks = list(G.stream(model, params, batch, eos_id=-1, **kw))
    kw.pop("chunk", None)
    assert [c.shape[1] for c in chunks] in ([4, 4, 2], [8, 8])
    np.testing.assert_array_equal(np.concatenate(chunks, 1),
                                  np.asarray(G.generate(model, params, batch, eos_id=-1, **kw)))


@pytest.mark.slow
def test_stream_stops_when_every_row_ended(setup):
  model, params, reqs = setup
  batch = G.batch_requests(reqs[:1])
  first = int(np.asarray(G.generate(model, params, batch, max_new_tokens=1, eos_id=-1))[0, 0])
  chunks = list(G.stream(model, params, batch, max_new_tokens=32, eos_id=first, chunk=4))
  assert len(chunks) == 1 and chunks[0].tolist() == [[first] * 4]


@pytest.mark.slow
def test_chunked_prefill_equals_one_shot(setup):
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  s = G.prompt_length(model, batch)
  prefill = jax.jit(lambda c: model.apply({"params": params}, **batch, max_len=s + 4, chunk=c,
                                          method=LlamaVid.prefill_cache), static_argnums=0)
  want_logits, want = prefill(0)
  for chunk in (4, 7):           # 19 positions: 4 chunks + 3, 2 chunks + 5
    logits, cache = prefill(chunk)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    real = np.asarray(want["valid"])[None, :, :, None, None]        # padding slots hold junk, never read
    for k in ("k", "v"):
      np.testing.assert_allclose(np.where(real, cache[k], 0), np.where(real, want[k], 0), atol=1e-5)
    for k in ("valid", "index", "pos"):
      np.testing.assert_array_equal(cache[k], want[k])
  np.testing.assert_array_equal(G.generate(model, params, batch, max_new_tokens=6, eos_id=-1, prefill_chunk=4),
                                G.generate(model, params, batch, max_new_tokens=6, eos_id=-1))


@pytest.mark.slow
def test_bfloat16_generation(setup):
  """dtype="bfloat16" computes and caches in bfloat16 (parameters stay fp32)."""
  model, params, reqs = setup
  batch = G.batch_requests(reqs)
  bf16 = G._model(model, "bfloat16")
  _, cache = bf16.apply({"params": params}, **batch, max_len=24, method=LlamaVid.prefill_cache)
  assert cache["k"].dtype == jax.numpy.bfloat16
  got = np.asarray(G.generate(model, params, batch, max_new_tokens=4, eos_id=-1, dtype="bfloat16"))
  assert got.shape == (3, 4) and ((got >= 0) & (got < model.cfg.llm.vocab_size)).all()
