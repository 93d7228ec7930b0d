"""inference.load(..., mesh=): parameters sharded by the logical rules; decoding on the
mesh equals decoding on one device (8 fake CPU devices, tests/conftest.py)."""

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


@pytest.mark.parametrize("shape", [{"tensor": 8}, {"fsdp": 4, "tensor": 2}, {"tensor": 2, "sequence": 4}])
@pytest.mark.slow
def test_sharded_decoding_equals_one_device(one, tiny_ckpt, shape):
  m, batch = one
  want_ids, want_lp = run(m, batch)
  mesh = sharding.make_mesh(shape)
  ms = inference.load(tiny_ckpt + "/inference", mesh=mesh)
  w = ms.params["llm"]["layers"]["gate_proj"]["kernel"]                   # [layers, embed, mlp]: mlp over tensor
  assert w.sharding.mesh.shape == mesh.shape and w.sharding.spec[2] == "tensor"
  assert w.addressable_shards[0].data.shape[2] == w.shape[2] // shape["tensor"]
  ids, lp = run(ms, batch)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(lp, want_lp, atol=1e-5)


def test_quant_with_mesh_is_refused_before_loading():
  with pytest.raises(ValueError, match="quant 'int8' with a mesh"):
    inference.load("/no/such/checkpoint", quant="int8", mesh=sharding.make_mesh({"tensor": 8}))
