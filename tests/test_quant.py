"""Qwix weight-only quantization of the LLM (llamavid_jax/quant.py): what is stored,
how far the token log-probabilities move, generation and loading through it."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import linen as nn

from llamavid_jax import generate as G
from llamavid_jax import inference, quant
from llamavid_jax.models import LlamaVid
from tests.test_generate import request

KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@pytest.fixture(scope="module")
def setup(tiny_cfg):
  """A tiny random model whose LLM is initialised at std 0.15, so that its next-token
  distributions are peaked (fp32 log-probs spread by ~1 nat around -5.3, not a uniform
  -log V that no quantization could move), and 3 left-padded requests."""
  cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, initializer_range=0.15))
  rng = np.random.RandomState(0)
  batch = G.batch_requests([request(cfg, rng, s, t) for s, t in ((12, 3), (16, 1), (9, 2))])
  model = LlamaVid(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **batch)["params"])
  return model, params, batch


def token_logprobs(model, params, batch) -> np.ndarray:
  """float32[n]: log p(next token) of every real text token that follows a real text
  token in the spliced sequence (teacher forcing, one full forward)."""
  logits, out = jax.jit(lambda p: model.apply({"params": p}, **batch))(params)
  lay = out["layout"]
  text = np.asarray(lay.valid) & ~np.asarray(lay.is_vis)                       # [B, S']
  ids = np.take_along_axis(batch["input_ids"], np.asarray(lay.text_idx), 1)   # [B, S'] the text id at a slot
  lp = np.asarray(jax.nn.log_softmax(logits, -1))
  r, i = np.nonzero(text[:, :-1] & text[:, 1:])
  return lp[r, i, ids[r, i + 1]]


def test_unknown_quant_is_refused_before_loading():
  with pytest.raises(ValueError, match=r"quant 'int3' is not one of \('int8', 'int4'\)"):
    inference.load("/no/such/checkpoint", quant="int3")
  quant.check(None)


@pytest.mark.parametrize("mode, bits, mean_max", [("int8", 8, 0.05), ("int4", 4, 0.3)])
@pytest.mark.slow
def test_kernels_are_stored_quantized_and_logprobs_stay_close(setup, mode, bits, mean_max):
  model, params, batch = setup
  qmodel, qparams = quant.quantize(model, params, mode)
  flat = flax.traverse_util.flatten_dict(qparams["llm"], is_leaf=lambda _, x: hasattr(x, "how"))
  kinds = {}
  for path, leaf in flat.items():
    name = path[-2]
    if name in KERNELS:
      q = leaf.array
      assert jnp.iinfo(q.qvalue.dtype).bits == bits and q.qvalue.shape == params["llm"][path[0]][name]["kernel"].shape \
          if path[0] == "layers" else q.qvalue.shape == params["llm"][name]["kernel"].shape, path
      kinds[name] = q.qvalue.dtype
    elif path == ("embed_tokens", "embedding"):   # ours: per row (and group of features for int4)
      assert isinstance(leaf, qwix.QArray) and jnp.iinfo(leaf.qvalue.dtype).bits == bits, leaf
      v, d = params["llm"]["embed_tokens"]["embedding"].shape
      assert leaf.qvalue.shape == (v, d) and leaf.scale.shape == (v, 1 if mode == "int8" else d // quant.group(model.cfg))
      kinds["embed_tokens"] = leaf.qvalue.dtype
    else:   # the norms stay float
      assert path[-1] == "scale" and leaf.dtype == jnp.float32, path
  assert set(kinds) == set(KERNELS) | {"embed_tokens"}, kinds
  # int8: one scale per output feature; int4: one per output feature and group of inputs
  gate = flat[("layers", "gate_proj", "kernel")].array
  d, f = model.cfg.llm.d_model, model.cfg.llm.mlp_dim
  assert gate.scale.shape == (model.cfg.llm.num_layers, 1 if mode == "int8" else d // quant.group(model.cfg), f)
  want = token_logprobs(model, params, batch)
  assert want.std() > 0.8, want          # peaked distributions: the deltas below can fail
  got = token_logprobs(qmodel, qparams, batch)
  delta = np.abs(got - want)
  print(f"{mode}: mean |delta logprob| {delta.mean():.4f}, max {delta.max():.4f} over {delta.size} tokens")
  assert 0 < delta.mean() <= mean_max, (delta.mean(), delta.max())


def test_quantizing_in_slices_changes_no_value(setup, monkeypatch):
  """A leaf quantized in slices along an output axis (`quant.CHUNK_BYTES`, what bounds
  the temporaries of a 7B table) has the values and scales of it quantized whole."""
  model, params, _ = setup
  _, whole = quant.quantize(model, params, "int4")
  monkeypatch.setattr(quant, "CHUNK_BYTES", 4096)   # the table and every kernel in several slices
  _, sliced = quant.quantize(model, params, "int4")
  assert jax.tree.structure(whole) == jax.tree.structure(sliced)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sliced)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_quantized_generation_in_bfloat16(setup):
  """Greedy decoding runs on the quantized model (its first ids are the quantized
  model's argmax, checked against its own full forward), also quantized for bf16."""
  model, params, batch = setup
  qmodel, qparams = quant.quantize(model, params, "int8")
  new = G.generate(qmodel, qparams, batch, max_new_tokens=3, eos_id=-1)
  logits, out = jax.jit(lambda p: qmodel.apply({"params": p}, **batch))(qparams)
  valid = np.asarray(out["layout"].valid)
  last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], 1)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits)[np.arange(3), last], -1), new[:, 0])
  bf16 = LlamaVid(dataclasses.replace(model.cfg, dtype="bfloat16"))
  qmodel, qparams = quant.quantize(bf16, params, "int4")
  assert qparams["llm"]["lm_head"]["kernel"].array.scale.dtype == jnp.bfloat16
  got = G.generate(qmodel, qparams, batch, max_new_tokens=3, eos_id=-1, dtype="bfloat16")
  assert got.shape == (3, 3) and ((got >= 0) & (got < model.cfg.llm.vocab_size)).all()


@pytest.mark.slow
def test_load_quantized(tiny_ckpt):
  """int4 weights, with the int8 KV cache beside them (the two are independent)."""
  m = inference.load(tiny_ckpt + "/inference", quant="int4", kv_cache="int8")
  q = m.params["llm"]["layers"]["q_proj"]["kernel"].array
  assert q.qvalue.dtype == jnp.int4 and m.quant == "int4" and m.cfg.kv_cache == "int8"
  [ans] = m.generate([m.request("What is it?", None)], max_new_tokens=4)
  assert len(ans.token_ids) <= 4


@pytest.mark.slow
def test_saved_quantized_checkpoint_loads_as_stored(tiny_ckpt, tmp_path, monkeypatch):
  """`python -m llamavid_jax.quant save` writes int values + scales with Orbax and the
  mode in conversion.json; `inference.load` reads them back bitwise (nothing
  requantized: the float source is not read) and equal to a fresh streamed quantization
  and to `quantize` of the whole float tree; another mode is refused before any
  parameter is read."""
  from llamavid_jax.checkpoint import orbax_io
  src, out = tiny_ckpt + "/inference", str(tmp_path / "q8")
  quant.main(["save", "--ckpt", src, "--quant", "int8", "--out", out, "--dtype", "float32"])
  assert quant.stored_quant(out) == "int8" and quant.stored_quant(src) is None
  fresh = inference.load(src, quant="int8")
  base = inference.load(src)
  _, whole = quant.quantize(base.model, base.params, "int8")
  for fn in ("_leaf_fn", "_embed_fn"):   # reading the stored tree quantizes nothing
    monkeypatch.setattr(quant, fn, None)
  m = inference.load(out)
  assert m.quant == "int8" and isinstance(m.params["llm"]["embed_tokens"]["embedding"], qwix.QArray)
  assert jax.tree.structure(m.params) == jax.tree.structure(fresh.params) == jax.tree.structure(whole)
  for got, want, w in zip(jax.tree.leaves(m.params), jax.tree.leaves(fresh.params), jax.tree.leaves(whole)):
    assert got.dtype == want.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(want))
  batch = G.batch_requests([m.request("What is it?", None)])
  logits = [np.asarray(x.model.apply({"params": x.params}, **batch)[0]) for x in (m, fresh)]
  np.testing.assert_array_equal(*logits)
  monkeypatch.setattr(orbax_io, "load_for_inference", None)   # the refusals come first
  with pytest.raises(ValueError, match=r"q8: the checkpoint is quantized int8; quant='int4' asks for int4"):
    inference.load(out, quant="int4")
