"""The int8 KV cache (`kv_cache="int8"`, models/llama.py `cache_spec`): what it stores,
how far decoding moves from the full-precision cache, and exactness of continuous
batching (engine vs generate) under it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamavid_jax import engine as engine_lib
from llamavid_jax import generate as G
from llamavid_jax import inference
from llamavid_jax.models import LlamaVid
from llamavid_jax.models.config import LlamaVidConfig
from llamavid_jax.models.llama import KV_ARRAYS, dequantize_kv, quantize_kv
from tests.test_quant import setup  # noqa: F401  (tiny model with peaked next-token distributions)

STEPS = 12


def int8(model: LlamaVid) -> LlamaVid:
  return model.clone(cfg=dataclasses.replace(model.cfg, kv_cache="int8"))


def test_unknown_kv_cache_is_refused_before_loading():
  with pytest.raises(ValueError, match=r"kv_cache 'int4' is not one of \('int8',\) \(or None: the compute dtype\)"):
    inference.load("/no/such/checkpoint", kv_cache="int4")
  with pytest.raises(ValueError, match=r"kv_cache 'fp8' is not one of"):
    LlamaVidConfig(kv_cache="fp8")


@pytest.mark.slow
def test_int8_cache_stores_int8_and_scales(setup):
  """The prefilled cache holds int8 k, v and float32 scales per (layer, row, slot, head),
  the engine's `cache_bytes` counts exactly those bytes, and layer 0's keys (the same
  input as the float cache's) are the float keys rounded: |dequantized - float| <= scale / 2."""
  model, params, batch = setup
  s = G.prompt_length(model, batch)
  prefill = lambda m: jax.jit(lambda p: m.apply({"params": p}, **batch, max_len=s + 4, method="prefill_cache"))(params)
  _, want = prefill(model)
  _, got = prefill(int8(model))
  llm = model.cfg.llm
  kv = (llm.num_layers, 3, s + 4, llm.num_kv_heads, llm.head_dim)
  assert {n: (got[n].dtype, got[n].shape) for n in KV_ARRAYS} == {
      "k": (jnp.int8, kv), "v": (jnp.int8, kv), "k_scale": (jnp.float32, kv[:-1]), "v_scale": (jnp.float32, kv[:-1])}
  stored = sum(got[n].nbytes for n in KV_ARRAYS)
  assert stored == engine_lib.cache_bytes(int8(model).cfg, 3, s + 4, "float32") == 2 * np.prod(kv[:-1]) * (kv[-1] + 4)
  assert engine_lib.cache_bytes(model.cfg, 3, s + 4, "float32") == sum(want[n].nbytes for n in ("k", "v"))
  real = np.asarray(want["valid"])[:, :, None, None]
  for n in ("k", "v"):
    err = np.abs(np.asarray(dequantize_kv(got[n][0], got[n + "_scale"][0])) - np.asarray(want[n][0]))
    bound = np.asarray(got[n + "_scale"][0])[..., None] / 2 + 1e-6
    assert (np.where(real, err, 0) <= bound).all() and np.where(real, err, 0).max() > 0, n
  q, scale = quantize_kv(jnp.zeros((1, 2, 1, 4)))       # an all-zero head: zeros, scale 0, no NaN
  assert not np.asarray(q).any() and not np.asarray(scale).any()


@pytest.mark.slow
def test_int8_decoding_stays_close_to_the_float_cache(setup):
  """Teacher-forced decode log-probs (prefill + 12 extend steps, 3 rows) with the int8
  cache vs the float32 cache: mean |delta| <= 0.01, max <= 0.03 (measured: see the
  printed line); greedy ids equal; chunked prefill gives the one-shot prefill's numbers."""
  model, params, batch = setup
  teacher = G.generate(model, params, batch, max_new_tokens=STEPS, eos_id=-1)
  want = G.teacher_logprobs(model, params, batch, teacher)
  # peaked: the greedy token is ~6x likelier than uniform (-log V = -4.85), so the deltas can fail
  assert want.mean() > -np.log(model.cfg.llm.vocab_size) + 1.5, want
  got = G.teacher_logprobs(int8(model), params, batch, teacher)
  delta = np.abs(got - want)
  print(f"int8 KV cache: mean |delta logprob| {delta.mean():.5f}, max {delta.max():.5f} over {delta.size} tokens")
  assert 0 < delta.mean() <= 0.01 and delta.max() <= 0.03, (delta.mean(), delta.max())
  np.testing.assert_allclose(G.teacher_logprobs(int8(model), params, batch, teacher, chunk=4), got, atol=1e-5)
  np.testing.assert_array_equal(G.generate(int8(model), params, batch, max_new_tokens=STEPS, eos_id=-1), teacher)


@pytest.mark.slow
@pytest.mark.parametrize("prefill_chunk", [0, 16])
def test_engine_with_int8_cache_gives_generates_tokens(tiny_ckpt, prefill_chunk):
  """Continuous batching stays exact under the int8 cache: each request's engine tokens
  are `Model.generate`'s for it alone, with the same int8 cache; the engine's state
  is the int8 cache that `cache_bytes` counts. Two slots, three requests: the third
  joins when a row frees. Prompts prefilled whole, or 16 positions a dispatch (the
  stage holds the int8 cache too)."""
  m = inference.load(tiny_ckpt + "/inference", kv_cache="int8")
  reqs = [m.request(q, None) for q in ["What is it?", "Describe the scene in detail.", "Why?"]]   # one bucket
  want = [m.generate([r], max_new_tokens=8)[0].token_ids for r in reqs]
  eng = engine_lib.Engine(m, slots=2, max_positions=128, decode_chunk=3, prefill_chunk=prefill_chunk)
  try:
    got = [h.result(timeout=300).token_ids for h in [eng.submit(r, engine_lib.Sampling(max_tokens=8)) for r in reqs]]
    cache = eng._state["cache"]
    assert cache["k"].dtype == jnp.int8 and cache["v_scale"].dtype == jnp.float32
    assert sum(cache[n].nbytes for n in KV_ARRAYS) == engine_lib.cache_bytes(m.cfg, 2, 128, m.dtype)
  finally:
    eng.close()
  assert got == want and any(want), (got, want)


@pytest.mark.slow
def test_int8_cache_on_a_mesh_equals_one_device(tiny_ckpt, tmp_path):
  """eval.chat --kv-cache int8 with the model split over the 8 devices (heads over
  tensor, cache slots over sequence): the one-device greedy ids."""
  import io
  import json

  from eval import chat
  feats = tmp_path / "f.npy"
  np.save(feats, np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32))

  def chat_ids(*extra):
    out = io.StringIO()
    chat.main(["--ckpt", tiny_ckpt, "--features", str(feats), "--question", "What is this?", "--json",
               "--temperature", "0", "--max-new-tokens", "6", "--kv-cache", "int8", *extra], stdout=out)
    return json.loads(out.getvalue())["token_ids"]

  assert chat_ids("--mesh", "tensor=2,sequence=4") == chat_ids()
