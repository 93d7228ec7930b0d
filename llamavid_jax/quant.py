"""Weight-only quantization of the LLM for inference, with Qwix's PTQ provider.

  quant.check("int8")                                   # ValueError for an unknown mode
  qmodel, qparams = quant.quantize(model, params, "int8")
  logits, cache = qmodel.apply({"params": qparams}, **batch, max_len=n, method="prefill_cache")

Modes (`QUANTS`): `int8`, per-channel int8 weights (one scale per output feature of
each kernel); `int4`, group-wise int4 weights (one scale per output feature and per
group of `INT4_GROUP` input features). Activations stay in the compute dtype (Qwix's
weight-only PTQ: the matmul runs on the int weights, the scale is applied to its output).

What is quantized: the LLM's matmul kernels (q/k/v/o projections, the SwiGLU MLP and
the LM head). The token embedding table is a lookup, not a matmul, and Qwix's PTQ does
not quantize lookups: it stays in the load dtype. The ViT, Q-Former and token
generator are not quantized (not measured: they are a small part of the weights of a
7B model, and the frozen ViT's features feed everything after it).

`qmodel` is the same LlamaVid wrapped by `qwix.quantize_model` (its `__call__`,
`prefill_cache`, `prefill_step` and `extend_cache` run under the provider), so it must be applied with
method NAMES ("prefill_cache"), not `LlamaVid.prefill_cache`. `qparams` holds Qwix's
quantized arrays in place of the kernels; each kernel is quantized on its own and its
full-precision copy dropped, so the device holds one full-precision kernel at most.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from llamavid_jax.models import LlamaVid
from llamavid_jax.models.layers import dense

INT4_GROUP = 128   # input features per int4 scale (the usual GPTQ / AWQ group)
QUANTS = ("int8", "int4")
METHODS = ("__call__", "prefill_cache", "prefill_step", "extend_cache")
_LLM = r"llm/(?!embed_tokens).*"   # every LLM module but the embedding lookup
_MLP = ("gate_proj", "up_proj", "down_proj")


def check(quant: str | None) -> None:
  """Raises a one-line ValueError unless `quant` is None or one of QUANTS."""
  if quant is not None and quant not in QUANTS:
    raise ValueError(f"quant {quant!r} is not one of {QUANTS} (or None)")


def group(cfg) -> int:
  """int4's group: INT4_GROUP, or the largest power of two dividing every contracted
  size of the LLM (d_model, mlp_dim, head_dim: o_proj's groups run along a head) when
  one is smaller (tiny test models)."""
  g = INT4_GROUP
  while any(n % g for n in (cfg.llm.d_model, cfg.llm.mlp_dim, cfg.llm.head_dim)):
    g //= 2
  return g


def rule(quant: str, cfg, module_path: str = _LLM) -> qwix.QuantizationRule:
  check(quant)
  if quant == "int8":
    return qwix.QuantizationRule(module_path=module_path, weight_qtype=jnp.int8)
  return qwix.QuantizationRule(module_path=module_path, weight_qtype=jnp.int4, tile_size=group(cfg))


def quantized_model(model: LlamaVid, quant: str) -> LlamaVid:
  """The model under Qwix's PTQ provider (apply it with method names)."""
  return qwix.quantize_model(model, qwix.PtqProvider([rule(quant, model.cfg)]), methods=METHODS)


def _example(cfg) -> dict:
  """A one-row batch of one frame (features) and 8 text ids: enough to trace init."""
  from llamavid_jax.generate import batch_requests   # serving helper, same layer
  n1, c = cfg.input_spec.feature_shape
  ids = np.full(8, 3, np.int32)
  ids[1] = cfg.image_token_id
  return batch_requests([dict(input_ids=ids, features=np.zeros((1, n1, c), np.float32),
                              qformer_ids=np.ones(4, np.int32), qformer_mask=np.ones(4, bool))])


def _mlp_how(quant: str, cfg):
  """Qwix's HowToQuantize of a 2-D kernel [in, out] contracted over `in`, as the MLP uses
  its kernels (`jnp.dot(h, w)`): read off a probe dense layer's PTQ init. The MLP's
  kernels live in `Kernel` sub-modules while the matmul runs in the block, so Qwix's
  init cannot tell them apart from activations; their apply-time matmul finds them
  quantized and uses them as such."""
  probe = qwix.quantize_model(dense(cfg.llm.mlp_dim, ("embed", "mlp"), use_bias=False),
                              qwix.PtqProvider([rule(quant, cfg, ".*")]))
  tree = jax.eval_shape(probe.init, jax.random.key(0), jnp.zeros((1, 1, cfg.llm.d_model)))["params"]
  return tree["kernel"]


def _quantize_leaf(w: jax.Array, how, stacked: bool, scale_dtype):
  q = lambda a: qwix.quantize(a, how.qtype, channelwise_axes=how.channelwise_axes, tiled_axes=how.tiled_axes,
                              calibration_method=how.calibration_method, scale_dtype=scale_dtype)
  return jax.jit(jax.vmap(q) if stacked else q)(w)


def quantize(model: LlamaVid, params: Any, quant: str) -> tuple[LlamaVid, Any]:
  """(model, float params) -> (the PTQ model, params with the LLM's kernels replaced by
  Qwix's quantized arrays). Leaves are moved to the device one at a time; each float
  kernel is quantized there and dropped. The scales are made in the model's compute
  dtype (`cfg.dtype`: a quantized matmul returns the scales' dtype), so the model
  must be quantized in the dtype it will run in (no `dtype=` override afterwards)."""
  check(quant)
  qmodel = quantized_model(model, quant)
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), **_example(model.cfg))["params"]
  is_aux = lambda x: hasattr(x, "how") and hasattr(x, "array")
  hows = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: is_aux(x))
  mlp = _mlp_how(quant, model.cfg)
  out = {}
  for path, w in flax.traverse_util.flatten_dict(params).items():
    aux = hows.get(path)
    if not is_aux(aux) and path[0] == "llm" and len(path) >= 2 and path[-2] in _MLP:
      aux = mlp
    mine = not isinstance(w, jax.Array)   # a host array: its device copy is ours to drop
    w = jax.device_put(w)
    if is_aux(aux):
      # a scanned stack's kernels carry a leading `layers` axis: quantized a layer at a time
      stacked = w.ndim == 3 if path[-2] in _MLP else getattr(aux.array.qvalue, "names", (None,))[0] == "layers"
      out[path] = aux.replace(array=_quantize_leaf(w, aux.how, stacked, jnp.dtype(model.cfg.dtype)))
      if mine:
        w.delete()
    else:
      out[path] = w
  return qmodel, flax.traverse_util.unflatten_dict(out)


def param_bytes(params: Any) -> int:
  """Bytes of every array in `params` as stored (int4 counts half a byte an element)."""
  total = 0
  for a in jax.tree.leaves(params):
    bits = jnp.iinfo(a.dtype).bits if jnp.issubdtype(a.dtype, jnp.integer) else jnp.finfo(a.dtype).bits
    total += a.size * bits // 8
  return total


def device_bytes(params: Any) -> int:
  """Bytes the arrays of `params` occupy on their devices (`addressable_shards`)."""
  return sum(s.data.nbytes for a in jax.tree.leaves(params) for s in a.addressable_shards)


__all__ = ["QUANTS", "INT4_GROUP", "check", "quantize", "quantized_model", "param_bytes", "device_bytes"]
