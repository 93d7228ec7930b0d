"""Inference entry points on a mesh (8 fake CPU devices, tests/conftest.py): chat, score
and eval.run --mesh equal one device on tensor 8, tensor 2 x sequence 4, fsdp 4 x
tensor 2 and data 8 (rows split, model replicated); a long movie prompt prefills split
over `sequence` into a KV cache sharded along its length, and decoding reads it in place.
(tests/test_inference_mesh.py: quantized parameters on meshes.)"""

import json

import jax
import numpy as np
import pytest

from bench.sequence_prefill import movie_request
from bench.sequence_prefill import prefill_and_decode as bench_prefill_and_decode
from llamavid_jax import generate as G
from llamavid_jax import inference, sharding


@pytest.fixture(scope="module")
def one(tiny_ckpt):
  return inference.load(tiny_ckpt + "/inference")


@pytest.fixture(scope="module")
def movie(one, tmp_path_factory):
  """A movie feature file of 32 frames with a subtitle line each (the release's format,
  `data/features.py`) and its request batch: 288 spliced LLM positions."""
  return movie_request(one, 32, str(tmp_path_factory.mktemp("movie")))


def prefill_and_decode(m, req, batch, steps=4):
  """On m's mesh: (next-token logits float32[1, V] of the prefill, its cache, `steps` greedy ids)."""
  return bench_prefill_and_decode(m, req, batch, steps)[1:]


@pytest.mark.parametrize("shape", [{"tensor": 2, "sequence": 4}, {"sequence": 8}])
@pytest.mark.slow
def test_long_movie_prefills_split_over_sequence(one, movie, tiny_ckpt, shape):
  """A 288-position movie prompt on a mesh with `sequence` > 1: the LLM attention runs as
  a ring (the checkpoint's `xla` replaced, a printed decision), the KV cache is sharded
  over `sequence` along its length (and its kv heads over `tensor`), the next-token logits
  equal one device's within 1e-5 and greedy decoding from the sharded cache gives the
  same ids; a chunked prefill, which cannot split so, is refused before compiling."""
  m = one
  req, batch = movie
  want_logits, want_cache, want_ids = prefill_and_decode(m, req, batch)
  ms = inference.load(tiny_ckpt + "/inference", mesh=sharding.make_mesh(shape))
  assert ms.cfg.attention_impl == "ring" and m.cfg.attention_impl == "xla"
  logits, cache, ids = prefill_and_decode(ms, req, batch)
  spec = tuple(cache["k"].sharding.spec) + (None,) * 5                  # [layers, B, T, K, Dh]
  assert spec[2] == "sequence" and (spec[3] == "tensor") == ("tensor" in shape)
  assert cache["k"].addressable_shards[0].data.shape[2] == cache["k"].shape[2] // shape["sequence"]
  assert cache["k"].shape[2] > want_cache["k"].shape[2]                  # whole budget, in n chunks of blocks
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  np.testing.assert_array_equal(ids, want_ids)
  with pytest.raises(ValueError, match="prefill_chunk 16 with the LLM length split over"):   # before compiling
    ms.check_generation([req], max_new_tokens=4, prefill_chunk=16)


def test_decode_attention_reads_a_sharded_cache_in_place():
  """A decode step's attention (one query) to keys sharded over `sequence` along their
  length equals the one-device reference, and its compiled program all-gathers no key."""
  from flax import linen as nn
  from llamavid_jax.ops import attention
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)
  k, v = (rng.standard_normal((2, 64, 2, 8)).astype(np.float32) for _ in range(2))
  valid = np.arange(64)[None] < np.array([[40], [57]])
  slots = np.array([[39], [56]], np.int32)
  want = attention.attention(q, k, v, kv_valid=valid, q_slots=slots, impl="reference")
  mesh = sharding.make_mesh({"tensor": 2, "sequence": 4})
  f = jax.jit(lambda q, k, v: attention.attention(q, k, v, kv_valid=valid, q_slots=slots, impl="ring"))
  kv = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence", "tensor"))
  k, v = jax.device_put(k, kv), jax.device_put(v, kv)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    got = f(q, k, v)
    hlo = f.lower(q, k, v).compile().as_text()
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert "f32[2,64" not in "".join(ln for ln in hlo.splitlines() if "all-gather" in ln)


MESHES = {"tensor=8": {"tensor": 8}, "tensor=2,sequence=4": {"tensor": 2, "sequence": 4},
          "fsdp=4,tensor=2": {"fsdp": 4, "tensor": 2}, "data=8": {"data": 8}}


def entry_points(m, ckpt, clip, tmp, mesh_flag=None):
  """Greedy results of chat (eval.chat's answer path: the engine), score (eval.score's
  log-probabilities) and eval.run (msvd_qa predictions on 3 questions, batches of 2) for
  model m; eval.run loads `ckpt` itself with `--mesh mesh_flag`."""
  import io
  import shutil
  from eval import chat, run, score
  from tests.test_eval_benchmarks import write
  media = m.media(video=clip)
  kw = dict(max_new_tokens=6, temperature=0.0, top_p=1.0, prefill_chunk=0, seed=0)
  engines = []
  try:
    out = io.StringIO()
    chat._turn(engines, m, ["What is the man doing?"], media, kw, True, out)
  finally:
    for e in engines:
      e.close()
  sc = score.Scorer(m).score("What is the man doing?", "He is running.", media=media)
  (tmp / "video").mkdir(exist_ok=True)
  shutil.copy(clip, tmp / "video" / "v0.mp4")
  qs = [{"video_id": "v0", "question": q, "answer": "x", "id": i}
        for i, q in enumerate(["What is this?", "Hello What is this?", "Describe it."])]
  argv = ["msvd_qa", "--ckpt", ckpt, "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "6",
          "--batch-size", "2", "--out", str(tmp / "pred.jsonl"), "--gt-file", write(tmp / "q.json", qs),
          "--video-folder", str(tmp / "video"), "--no-progress"] + (["--mesh", mesh_flag] if mesh_flag else [])
  run.main(argv)
  preds = [json.loads(line)["pred"] for line in open(tmp / "pred.jsonl")]
  return json.loads(out.getvalue())["token_ids"], sc, preds


@pytest.fixture(scope="module")
def one_entry(one, tiny_ckpt, clip28, tmp_path_factory):
  return entry_points(one, tiny_ckpt, clip28, tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("flag", list(MESHES))
@pytest.mark.slow
def test_entry_points_on_a_mesh_equal_one_device(one, one_entry, tiny_ckpt, clip28, tmp_path, flag):
  """chat's greedy ids, score's log-probabilities (within 1e-5) and greedy flag, and
  eval.run's predictions (`--mesh FLAG`) on the mesh equal one device's. With data=8 the
  parameters are replicated and the request rows split over the 8 devices (2 rows
  padded to 8)."""
  shape = MESHES[flag]
  ms = inference.load(tiny_ckpt + "/inference", mesh=sharding.make_mesh(shape))
  w = ms.params["llm"]["layers"]["gate_proj"]["kernel"]                   # [layers, embed, mlp]: mlp over tensor
  assert w.sharding.mesh.shape == ms.mesh.shape and w.sharding.spec[2] == "tensor"
  assert w.addressable_shards[0].data.shape[2] == w.shape[2] // shape.get("tensor", 1)
  want_ids, want_sc, want_preds = one_entry
  ids, sc, preds = entry_points(ms, tiny_ckpt, clip28, tmp_path, flag)
  assert ids == want_ids and preds == want_preds and sc["is_greedy"] == want_sc["is_greedy"]
  np.testing.assert_allclose(sc["token_logprobs"], want_sc["token_logprobs"], atol=1e-5)
  assert len(ids) and any(want_preds)   # not empty: the comparison says something
  if flag == "data=8":
    reqs = [ms.request(q, ms.media(video=clip28)) for q in ("What is this?", "Describe it.")]
    batch = ms._batch(reqs, None, None)
    assert len(batch["input_ids"]) == 8
    assert w.sharding.is_fully_replicated
    with ms.on_mesh():
      _, cache = jax.jit(lambda p: ms.model.apply({"params": p}, **batch, max_len=G.prompt_length(ms.model, batch) + 1,
                                                  method="prefill_cache"))(ms.params)
    assert sharding.spec_axes(cache["k"].sharding.spec[1]) == ("data",)   # [layers, B, T, K, Dh]: rows over data
    assert cache["k"].addressable_shards[0].data.shape[1] == 1
