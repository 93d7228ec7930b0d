"""inference.load(..., quant=, mesh=): quantized parameters sharded by the logical rules
(scales with their values); decoding on the mesh equals the quantized model's decoding on
one device (8 fake CPU devices, tests/conftest.py). Unquantized parameters on meshes, with
every entry point: tests/test_inference_shard.py."""

import jax
import numpy as np
import pytest

from llamavid_jax import generate as G
from llamavid_jax import inference, sharding
from llamavid_jax.models import LlamaVid


@pytest.fixture(scope="module")
def one(tiny_ckpt):
  m = inference.load(tiny_ckpt + "/inference")
  reqs = [m.request("What is the man doing?", None), m.request("Describe it in detail.", None)]
  return m, m._batch(reqs, None, None)


def run(m, batch):
  ids = G.generate(m.model, m.params, batch, max_new_tokens=6, eos_id=-1)
  s = G.prompt_length(m.model, batch)
  logits, _ = jax.jit(lambda p: m.model.apply({"params": p}, **batch, max_len=s + 1, method="prefill_cache"))(m.params)
  return ids, np.asarray(jax.nn.log_softmax(logits, -1))


def test_quantized_placement_splits_scales_with_their_values(tiny_cfg):
  """`quant.Plan.placement` (no checkpoint): every scale dim with more than one entry is
  split as its qvalue's dim; int4's 8 groups of down_proj's 64 inputs split over tensor 8
  with their values; what does not split (the tiny LLM's 4 heads over 8) is listed, and
  strict=True refuses it."""
  import flax
  from llamavid_jax import quant
  plan = quant.Plan(LlamaVid(tiny_cfg), "int4")
  mesh = sharding.make_mesh({"tensor": 8})
  where, lines = plan.placement(mesh)
  quantized = {p: q for p, q in where.items() if plan.quantized(p)}
  assert len(quantized) == 9   # 7 kernels of the layer stack, lm_head, the embedding table
  abstract = flax.traverse_util.flatten_dict(plan.abstract(mesh), is_leaf=lambda _, x: quant.is_quantized(x))
  for path, q in quantized.items():
    a = abstract[path].array if path != quant.EMBED else abstract[path]
    for d, (vs, ss) in enumerate(zip(q.qvalue.spec + (None,) * 4, q.scale.spec + (None,) * 4)):
      if d < a.scale.ndim and a.scale.shape[d] > 1:
        assert vs == ss, (path, d, q.qvalue.spec, q.scale.spec)
  down = quantized[("llm", "layers", "down_proj", "kernel")]
  assert down.qvalue.spec[1] == down.scale.spec[1] == "tensor"
  assert "llm/layers/q_proj/kernel/qvalue: dim 2 (4) not split over tensor" in lines
  with pytest.raises(ValueError, match=r"quant int4 on mesh .*q_proj/kernel/qvalue: dim 2 \(4\) not split"):
    plan.placement(mesh, strict=True)


@pytest.fixture(scope="module")
def one_quant(tiny_ckpt, one):
  """{mode: (greedy ids, log-probs)} of the model quantized on one device."""
  _, batch = one
  return {q: run(inference.load(tiny_ckpt + "/inference", quant=q), batch) for q in ("int8", "int4")}


@pytest.mark.parametrize("quant, shape, src", [("int8", {"tensor": 8}, "/inference"),
                                               ("int8", {"fsdp": 4, "tensor": 2}, ""),   # the train WORKDIR
                                               ("int4", {"tensor": 2}, "/inference")])
@pytest.mark.slow
def test_quantized_decoding_on_a_mesh_equals_one_device(one, one_quant, tiny_ckpt, quant, shape, src, capsys):
  """Qwix's int values placed as their float kernels, scales along the same output axes:
  the one-device quantized model's greedy ids and fp32 log-probs (within 1e-5), from an
  inference directory or the train WORKDIR that exported it. What does not split (tiny's
  4 heads over tensor 8) is printed before loading, not replicated silently."""
  _, batch = one
  want_ids, want_lp = one_quant[quant]
  n = int(np.prod(list(shape.values())))
  mesh = sharding.make_mesh(shape, jax.devices()[:n])
  ms = inference.load(tiny_ckpt + src, mesh=mesh, quant=quant)
  printed = capsys.readouterr().out
  assert ("llm/layers/q_proj/kernel/qvalue: dim 2 (4) not split over tensor" in printed) == (shape["tensor"] == 8)
  t = shape["tensor"]
  gate = ms.params["llm"]["layers"]["gate_proj"]["kernel"].array          # [layers, embed, mlp]: mlp over tensor
  assert gate.qvalue.dtype == getattr(jax.numpy, quant)
  assert gate.qvalue.sharding.spec[2] == gate.scale.sharding.spec[2] == "tensor"
  assert gate.qvalue.addressable_shards[0].data.shape == (2, 32 // shape.get("fsdp", 1), 64 // t)
  assert gate.scale.addressable_shards[0].data.shape[2] == 64 // t
  down = ms.params["llm"]["layers"]["down_proj"]["kernel"].array          # [layers, mlp, embed]: contracted mlp
  assert down.qvalue.addressable_shards[0].data.shape[1] == 64 // t
  if quant == "int4":   # 8 groups of 8 mlp inputs: the group scales split over tensor with their values
    assert down.scale.shape[1] == 8 and down.scale.addressable_shards[0].data.shape[1] == 8 // t
  ids, lp = run(ms, batch)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(lp, want_lp, atol=1e-5)


@pytest.mark.slow
def test_saved_quantized_checkpoint_on_a_mesh(one, one_quant, tiny_ckpt, tmp_path, monkeypatch):
  """A quantized checkpoint (`quant save`) read onto fsdp 4 x tensor 2 as stored, each
  qvalue and scale read straight onto its place (nothing requantized): the one-device
  quantized model's ids and log-probs."""
  from llamavid_jax import quant
  out = str(tmp_path / "q4")
  quant.main(["save", "--ckpt", tiny_ckpt + "/inference", "--quant", "int4", "--out", out, "--dtype", "float32"])
  real = quant.Plan.__call__
  monkeypatch.setattr(quant.Plan, "__call__", lambda self, path, w, place=None: (
      pytest.fail(f"requantized {path}") if self.quantized(path) and not quant.is_quantized(w) else real(self, path, w, place)))
  ms = inference.load(out, mesh=sharding.make_mesh({"fsdp": 4, "tensor": 2}))
  up = ms.params["llm"]["layers"]["up_proj"]["kernel"].array               # [layers, embed, mlp]
  assert ms.quant == "int4" and up.qvalue.sharding.spec[1:] == (("fsdp", "sequence"), "tensor")
  assert up.qvalue.addressable_shards[0].data.shape == (2, 8, 32) and up.scale.addressable_shards[0].data.shape == (2, 1, 32)
  ids, lp = run(ms, one[1])
  np.testing.assert_array_equal(ids, one_quant["int4"][0])
  np.testing.assert_allclose(lp, one_quant["int4"][1], atol=1e-5)
