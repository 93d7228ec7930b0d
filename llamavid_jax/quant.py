"""Weight-only quantization of the LLM for inference, with Qwix's PTQ provider.

  quant.check("int8")                                   # ValueError for an unknown mode
  qmodel, qparams = quant.quantize(model, params, "int8")
  logits, cache = qmodel.apply({"params": qparams}, **batch, max_len=n, method="prefill_cache")
  python -m llamavid_jax.quant save --ckpt IN --quant int8 --out DIR   # a quantized checkpoint
  inference.load(DIR)                                   # read as stored, nothing requantized

Modes (`QUANTS`): `int8`, per-channel int8 weights (one scale per output feature of
each kernel); `int4`, group-wise int4 weights (one scale per output feature and per
group of `INT4_GROUP` input features). Activations stay in the compute dtype (Qwix's
weight-only PTQ: the matmul runs on the int weights, the scale is applied to its output).

What is quantized: the LLM's matmul kernels (q/k/v/o projections, the SwiGLU MLP and
the LM head), and its token embedding table, per row (int8: one scale a row; int4: one
per row and group of `group(cfg)` features). Qwix's PTQ quantizes matmuls only, not
lookups, so the table is ours: `quantize` stores it as a `qwix.QArray`, and the
provider here (`Provider`) also intercepts `jnp.take` (what `nn.Embed` gathers with): a
quantized table gives the gathered rows' int values times their scales, so only the
looked-up rows are ever dequantized. A tied table (`llm.tie_embeddings`, also the LM
head) stays float (a printed decision). The ViT, Q-Former and token
generator are not quantized (not measured: they are a small part of the weights of a
7B model, and the frozen ViT's features feed everything after it).

`qmodel` is the same LlamaVid wrapped by `qwix.quantize_model` (its `__call__`,
`embed_inputs`, `prefill_cache`, `prefill_step` and `extend_cache` run under the provider), so it must be applied with
method NAMES ("prefill_cache"), not `LlamaVid.prefill_cache`. `qparams` holds Qwix's
quantized arrays in place of the kernels; each kernel is quantized on its own and its
full-precision copy dropped, so the device holds one full-precision kernel at most,
and in slices of CHUNK_BYTES along an output axis (bounded temporaries; the same values).

Checkpoints: `reader` is what `inference.load(..., quant=)` reads parameters with: a
float checkpoint a leaf at a time (`orbax_io.iter_params`, largest first), each leaf
quantized before the next is read; a quantized one (`save`: int values and scales with
Orbax, conversion.json's RECORD naming the mode) as stored (`restore`). A quantized
checkpoint loads in its own mode; another is refused before any parameter is read
(`check_stored`). Peak host memory of both: bench/quant_memory.py.

On a mesh (`reader(..., mesh)`, `restore(..., mesh)`) every array goes where the logical
rules put it (`Plan.placement`): a kernel's int values where its float kernel would go,
its scales along the same axes (`scale_names`), each float kernel read onto its place and
quantized there; what its mesh axes cannot split is printed before anything is read.
`Plan.abstract` gives the same placed tree as ShapeDtypeStructs (the memory plan's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn

from llamavid_jax import cli, sharding
from llamavid_jax.checkpoint import layout, orbax_io
from llamavid_jax.models import LlamaVid
from llamavid_jax.models.layers import dense

INT4_GROUP = 128   # input features per int4 scale (the usual GPTQ / AWQ group)
QUANTS = ("int8", "int4")
METHODS = ("__call__", "embed_inputs", "prefill_cache", "prefill_step", "extend_cache")
_LLM = r"llm/(?!embed_tokens).*"   # every LLM module but the embedding lookup (ours, `Provider`)
_MLP = ("gate_proj", "up_proj", "down_proj")
EMBED = ("llm", "embed_tokens", "embedding")


class Provider(qwix.PtqProvider):
  """Qwix's PTQ provider, plus the lookup of a quantized embedding table: `jnp.take`
  of a `qwix.QArray` (rows along axis 0) gathers the rows' int values and scales, then
  dequantizes them (in the scales' dtype, the compute dtype). Every other `jnp.take` is
  jax's."""

  def get_intercept_map(self):
    return super().get_intercept_map() | {"jax.numpy.take": self.take}

  def take(self, a, indices, axis=None, **kw):
    if not isinstance(a, qwix.QArray):
      return jnp.take(a, indices, axis=axis, **kw)   # the interceptor is off inside its handler: jax's take
    if axis != 0 or kw:
      raise ValueError(f"a quantized table is looked up by rows (axis 0), not axis={axis} {kw or ''}")
    return qwix.dequantize(a[indices])               # [*indices.shape, D] in the scales' dtype


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
  return qwix.quantize_model(model, Provider([rule(quant, model.cfg)]), methods=METHODS)


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


CHUNK_BYTES = 32 << 20   # a leaf is quantized in slices of at most this many input bytes


def _chunked(q, w: jax.Array, axis: int):
  """q(w) computed on slices of `w` along `axis` (one q's scales do not reduce over,
  so each slice's values and scales are those of the whole), concatenated: the device
  holds one slice's temporaries (XLA's CPU quantization of a whole 250 MiB bf16 table
  takes ~3x its size more), not the whole leaf's."""
  n = min(w.shape[axis], max(1, -(-w.nbytes // CHUNK_BYTES)))
  if n == 1:
    return jax.jit(q)(w)
  size = w.shape[axis]
  n = next((k for k in range(n, min(size, 4 * n) + 1) if size % k == 0), n)   # equal slices: one compile
  cuts = np.linspace(0, size, n + 1).astype(int)
  qj = jax.jit(q)
  # each slice done before the next is cut: dispatched ahead, all slices' copies would coexist
  parts = [jax.block_until_ready(qj(jax.lax.slice_in_dim(w, a, b, axis=axis))) for a, b in zip(cuts[:-1], cuts[1:])]
  return jax.tree.map(lambda *x: jnp.concatenate(x, axis=axis), *parts)


def _embed_fn(quant: str, cfg):
  """The quantization of the embedding table float[V, D] -> QArray (see `quantize_embedding`)."""
  check(quant)
  tiles = {} if quant == "int8" else {1: group(cfg)}
  return lambda t: qwix.quantize(t, jnp.int8 if quant == "int8" else jnp.int4, channelwise_axes=(0,),
                                 tiled_axes=tiles, scale_dtype=jnp.dtype(cfg.dtype))


def quantize_embedding(table: jax.Array, quant: str, cfg) -> qwix.QArray:
  """float[V, D] -> QArray: int8 with one scale a row, or int4 with one a row and group
  of `group(cfg)` features; scales in the compute dtype `cfg.dtype`."""
  return _chunked(_embed_fn(quant, cfg), table, 0)


def _leaf_fn(how, shape: tuple[int, ...], stacked: bool, scale_dtype):
  """(the quantization of a kernel of `shape` (a scanned stack of them: `stacked`, a layer
  at a time), the axis it may be cut along: its largest channelwise (output) axis)."""
  q = lambda a: qwix.quantize(a, how.qtype, channelwise_axes=how.channelwise_axes, tiled_axes=how.tiled_axes,
                              calibration_method=how.calibration_method, scale_dtype=scale_dtype)
  axes = [a + stacked for a in how.channelwise_axes] + ([0] if stacked else [])
  return (jax.vmap(q) if stacked else q), max(axes, key=lambda a: shape[a])


def scale_names(names: tuple, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple:
  """Logical axis names of a QArray's scale: its qvalue's (`names`, `shape`: the kernel's),
  None where the scale has one entry along a longer dim (a contracted axis of int8, an
  int4 axis of one group). An int4 axis of several groups keeps its name, so its groups
  split as the qvalue's dim does where the mesh axis divides their count."""
  return tuple(None if s == 1 and d != 1 else n for n, d, s in zip(names, shape, scale_shape))


def _is_aux(x) -> bool:
  return hasattr(x, "how") and hasattr(x, "array")


def is_quantized(leaf) -> bool:
  """A leaf as `quantize` stores a quantized one: Qwix's WithAux (a kernel) or a
  QArray (the embedding table)."""
  return _is_aux(leaf) or isinstance(leaf, qwix.QArray)


class Plan:
  """How `quant` stores each parameter of `model`: `plan(path, w)` -> the leaf the PTQ
  model (`plan.model`) takes (moved to the device; a kernel or the embedding table
  quantized there, its float copy dropped when it was ours), `plan.rebuild(path,
  qvalue, scale)` -> the same quantized leaf from stored arrays, `plan.quantized(path)`
  -> whether `path` is stored quantized."""

  def __init__(self, model: LlamaVid, quant: str):
    check(quant)
    self.quant, self.cfg = quant, model.cfg
    self.model = quantized_model(model, quant)
    abstract = jax.eval_shape(self.model.init, jax.random.key(0), **_example(model.cfg))["params"]
    self.hows = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_aux(x))
    self.mlp = _mlp_how(quant, model.cfg)
    if model.cfg.llm.tie_embeddings:
      print(f"quant {quant}: the tied embedding table (also the LM head) stays {jnp.dtype(model.cfg.dtype).name}")

  def _aux(self, path):
    aux = self.hows.get(path)
    if not _is_aux(aux) and path[0] == "llm" and len(path) >= 2 and path[-2] in _MLP:
      return self.mlp
    return aux if _is_aux(aux) else None

  def quantized(self, path) -> bool:
    return (path == EMBED and not self.cfg.llm.tie_embeddings) or self._aux(path) is not None

  def _fn(self, path, shape: tuple[int, ...]):
    """(the pure quantization of the leaf at `path` of `shape` -> QArray, its cut axis)."""
    if path == EMBED:
      return _embed_fn(self.quant, self.cfg), 0
    aux = self._aux(path)
    # a scanned stack's kernels carry a leading `layers` axis: quantized a layer at a time
    stacked = len(shape) == 3 if path[-2] in _MLP else getattr(aux.array.qvalue, "names", (None,))[0] == "layers"
    return _leaf_fn(aux.how, shape, stacked, jnp.dtype(self.cfg.dtype))

  def boxed(self, path, box: nn.Partitioned) -> qwix.QArray:
    """The quantized leaf at `path` of a boxed float leaf, abstractly: a QArray of boxed
    ShapeDtypeStructs, its qvalue named as the float leaf, its scale by `scale_names`."""
    fn, _ = self._fn(path, box.value.shape)
    q = jax.eval_shape(fn, jax.ShapeDtypeStruct(box.value.shape, jnp.dtype(self.cfg.dtype)))
    return q.replace(qvalue=nn.Partitioned(q.qvalue, box.names),
                     scale=nn.Partitioned(q.scale, scale_names(box.names, q.qvalue.shape, q.scale.shape)))

  def _boxed_tree(self, boxed=None) -> tuple[list, dict]:
    """(the parameter paths, {"a/b/c": boxed float leaf, or the QArray of boxed abstract
    arrays it is stored as}) of `boxed` (default `orbax_io.abstract_params` of the config)."""
    flat = flax.traverse_util.flatten_dict(orbax_io.abstract_params(self.cfg) if boxed is None else boxed,
                                           is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    return list(flat), {"/".join(p): self.boxed(p, b) if self.quantized(p) else b for p, b in flat.items()}

  def placement(self, mesh, boxed=None, strict: bool = False) -> tuple[dict, list[str]]:
    """Where each stored array goes on `mesh`, by the logical rules (`sharding`): ({path:
    NamedSharding of a float leaf, or a QArray of the qvalue's and the scale's}, one line
    per array that keeps fewer mesh axes than its names ask: a dim they do not divide is
    replicated). strict: such an array is an error instead. `boxed`: the model's boxed
    abstract parameters (default `orbax_io.abstract_params` of the config)."""
    return self._placement(*self._boxed_tree(boxed), mesh, strict)

  def _placement(self, paths, tree, mesh, strict: bool = False) -> tuple[dict, list[str]]:
    lines = sharding.replicated_leaves(tree, mesh)
    if strict and lines:
      raise ValueError(f"quant {self.quant} on mesh {dict(mesh.shape)}: " + "; ".join(lines))
    out = sharding.param_shardings(tree, mesh)
    return {p: out["/".join(p)] for p in paths}, lines

  def abstract(self, mesh, boxed=None) -> Any:
    """The parameters as the PTQ model takes them once placed on `mesh` (`placement`),
    as ShapeDtypeStructs with their shardings: what a memory plan compiles."""
    paths, tree = self._boxed_tree(boxed)
    where, _ = self._placement(paths, tree, mesh)
    out = {}
    for p in paths:
      sds = jax.tree.map(lambda b, s: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype, sharding=s),
                         tree["/".join(p)], where[p], is_leaf=lambda x: isinstance(x, nn.Partitioned))
      out[p] = self.wrap(p, sds) if self.quantized(p) else sds
    return flax.traverse_util.unflatten_dict(out)

  def wrap(self, path, q: qwix.QArray):
    """A QArray as the PTQ model takes the leaf at `path` (a kernel: in Qwix's WithAux)."""
    return q if path == EMBED else self._aux(path).replace(array=q)

  def __call__(self, path, w, place=None):
    """`w` stored as the PTQ model takes it. `place` (from `placement`): the leaf is
    placed there (a quantized one quantized where its float leaf lies, whole: per device
    its shard's temporaries), else on the default device (quantized in slices)."""
    if is_quantized(w):   # already quantized (a quantized checkpoint): kept as it is
      return w
    mine = not isinstance(w, jax.Array)   # a host array: its device copy is ours to drop
    if not self.quantized(path):
      return jax.device_put(w, place)
    fn, axis = self._fn(path, w.shape)
    if place is None:
      w = jax.device_put(w)
      q = _chunked(fn, w, axis)
    else:
      w = jax.device_put(w, place.qvalue)
      q = jax.jit(fn, out_shardings=place)(w)
    if mine:
      w.delete()
    return self.wrap(path, q)

  def rebuild(self, path, qvalue: jax.Array, scale: jax.Array):
    return self.wrap(path, qwix.QArray(qvalue, scale))


def quantize(model: LlamaVid, params: Any, quant: str) -> tuple[LlamaVid, Any]:
  """(model, float params) -> (the PTQ model, params with the LLM's kernels replaced by
  Qwix's quantized arrays and its embedding table by a QArray). Leaves are moved to the
  device one at a time; each float kernel is quantized there and dropped. Leaves
  already quantized (a quantized checkpoint, `restore`) are kept. The scales are made
  in the model's compute dtype (`cfg.dtype`: a quantized matmul returns the scales'
  dtype), so the model must be quantized in the dtype it will run in (no `dtype=`
  override afterwards)."""
  plan = Plan(model, quant)
  flat = flax.traverse_util.flatten_dict(params, is_leaf=lambda _, x: is_quantized(x))
  return plan.model, flax.traverse_util.unflatten_dict({path: plan(path, w) for path, w in flat.items()})


# --- quantized checkpoints -------------------------------------------------------------
RECORD = "quantized"   # conversion.json's key of a quantized checkpoint: {mode, dtype, group, source}


def stored_quant(ckpt: str) -> str | None:
  """The mode a quantized inference directory was saved in (its conversion.json's
  RECORD), None for any other directory (or an unreadable conversion.json, which the
  load then names). Reads no parameter."""
  path = os.path.join(ckpt, layout.CONVERSION)
  if layout.kind(ckpt) != "inference" or not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f).get(RECORD)
    return None if record is None else record["mode"]
  except (OSError, ValueError, AttributeError, TypeError, KeyError):   # unreadable: the load names it
    return None


def check_stored(ckpt: str, quant: str | None) -> str | None:
  """The mode to load `ckpt` in: `quant`, or a quantized checkpoint's own mode. Raises
  a one-line ValueError, before any parameter is read, when `quant` asks a quantized
  checkpoint for another mode (its float weights are gone: nothing to requantize)."""
  check(quant)
  stored = stored_quant(ckpt)
  if stored is not None and quant not in (None, stored):
    raise ValueError(f"{ckpt}: the checkpoint is quantized {stored}; quant={quant!r} asks for {quant} "
                     f"(load it with quant=None or {stored!r}, or quantize its float source)")
  return quant or stored


def _to_stored(params: Any) -> dict:
  """Quantized tree -> plain nested dicts for Orbax: a quantized leaf becomes
  {"qvalue": int8 / int4, "scale": float}."""
  out = {}
  for path, w in flax.traverse_util.flatten_dict(params, is_leaf=lambda _, x: is_quantized(x)).items():
    q = w.array if _is_aux(w) else w
    if isinstance(q, qwix.QArray):
      out[path + ("qvalue",)], out[path + ("scale",)] = q.qvalue, q.scale
    else:
      out[path] = w
  return flax.traverse_util.unflatten_dict(out)


def _stored_place(placement: dict):
  """`placement` (`Plan.placement`) as `orbax_io.iter_params`'s `place` of a stored
  tree: a quantized leaf's `qvalue` and `scale` go where its QArray's do."""
  def place(key):
    if key[-1] in ("qvalue", "scale") and isinstance(placement.get(key[:-1]), qwix.QArray):
      return getattr(placement[key[:-1]], key[-1])
    return placement[key]
  return place


def restore(ckpt: str, model: LlamaVid, quant: str, mesh=None) -> tuple[LlamaVid, Any]:
  """A quantized inference directory (`save`) -> (the PTQ model, params) read a leaf
  at a time straight into device arrays, nothing requantized: int values as stored, the float leaves and
  scales cast to the compute dtype `model.cfg.dtype`. The stored tree is checked
  against the model (one line naming the path) before any array is read. `mesh`: every
  array read onto its place there (`Plan.placement`, its decisions printed)."""
  plan = Plan(model, quant)
  stored = flax.traverse_util.flatten_dict(orbax_io.stored_metadata(ckpt))
  want = flax.traverse_util.flatten_dict(orbax_io.shape_tree(model.cfg), is_leaf=lambda _, x: isinstance(x, tuple))
  keys = {p[:-1] if p[-1] in ("qvalue", "scale") and p[:-1] in want else p for p in stored}
  for path in sorted(keys):   # the stored leaves, as `orbax_io.restore` checks a float tree
    q = path + ("qvalue",) in stored
    if path not in want:
      raise ValueError(f"{ckpt}: stored parameter {'/'.join(path)} is not in the model")
    shape = tuple(stored[path + ("qvalue",)].shape if q else stored[path].shape)
    if q != plan.quantized(path) or shape != tuple(want[path]):
      kind = lambda quantized: "quantized" if quantized else "float"
      raise ValueError(f"{ckpt}: parameter {'/'.join(path)}: stored {kind(q)} {shape}, the model takes "
                       f"{kind(plan.quantized(path))} {tuple(want[path])}")
  place = None if mesh is None else _stored_place(placed(plan, mesh))
  out, parts = {}, {}
  for key, a in orbax_io.iter_params(ckpt, dtype=jnp.dtype(model.cfg.dtype), check=False, device=True, place=place):
    if key[:-1] in keys and plan.quantized(key[:-1]):   # a qvalue or a scale: a leaf once both are read
      parts.setdefault(key[:-1], {})[key[-1]] = a
      if len(parts[key[:-1]]) == 2:
        q = parts.pop(key[:-1])
        out[key[:-1]] = plan.rebuild(key[:-1], q["qvalue"], q["scale"])
    else:
      out[key] = a
  return plan.model, flax.traverse_util.unflatten_dict(out)


def placed(plan: Plan, mesh) -> dict:
  """`plan.placement(mesh)`, its decisions printed first (one line each): the arrays that
  keep fewer mesh axes than their names ask, replicated along those dims."""
  where, lines = plan.placement(mesh)
  if lines:
    print(f"quant {plan.quant} on mesh {dict(mesh.shape)}: {len(lines)} arrays replicated along a dim their mesh "
          "axes do not divide:\n  " + "\n  ".join(lines))
  return where


def reader(quant: str, dtype: str, mesh=None):
  """`orbax_io.load_for_inference`'s `read_params` for `quant` at compute `dtype`: a
  quantized checkpoint of that mode is restored as stored (`restore`); any other is
  read a leaf at a time (`orbax_io.iter_params`) and each leaf quantized on the device
  before the next is read, so its full-precision copy is never all resident. `quant`
  is the mode `check_stored` settled for the checkpoint (`inference.load`). `mesh`:
  every leaf read onto its place there by the logical rules (`Plan.placement`: a
  kernel's qvalue as its float kernel, the scale along its kernel's output axes), each
  kernel quantized where it lies."""
  def read(path: str, step: int | None, cfg) -> Any:
    model = LlamaVid(dataclasses.replace(cfg, dtype=dtype))
    if stored_quant(path) is not None:
      return restore(path, model, quant, mesh)[1]
    plan = Plan(model, quant)
    where = None if mesh is None else placed(plan, mesh)
    place = None if where is None else (lambda key: where[key].qvalue if plan.quantized(key) else where[key])
    out = {}
    for key, w in orbax_io.iter_params(path, step=step, dtype=jnp.dtype(dtype), device=True, place=place):
      out[key] = plan(key, w, None if where is None else where[key])
      if plan.quantized(key):   # its float copy goes before the next leaf is read
        w.delete()
      del w
    return flax.traverse_util.unflatten_dict(out)
  return read


def save(out: str, model: LlamaVid, params: Any, quant: str, source: str) -> None:
  """A quantized inference directory: `params` (from `quantize` / `reader`) with Orbax
  as int values + scales, `model`'s config, conversion.json = the source's + RECORD
  (mode, compute dtype, int4 group, source path), the source's tokenizers copied.
  `source` must be an inference directory (a train WORKDIR: export it first)."""
  if layout.kind(source) != "inference":
    raise ValueError(f"{source}: not an inference directory (export a train WORKDIR first: "
                     "python -m llamavid_jax.export --from-train)")
  cfg = model.cfg
  meta = orbax_io.load_conversion(source)
  if RECORD in meta:
    raise ValueError(f"{source}: already quantized {meta[RECORD]['mode']}")
  meta[RECORD] = dict(mode=quant, dtype=jnp.dtype(cfg.dtype).name, group=group(cfg) if quant == "int4" else None,
                      source=os.path.abspath(source))
  orbax_io.save(out, _to_stored(params), cfg, meta)
  for name in (layout.TOKENIZER, layout.QFORMER_TOKENIZER):
    shutil.copytree(os.path.join(source, name), os.path.join(out, name), dirs_exist_ok=True)


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


def main(argv=None) -> None:
  """python -m llamavid_jax.quant save --ckpt IN --quant int8 --out DIR [--dtype bfloat16]"""
  p = cli.ArgumentParser(prog="python -m llamavid_jax.quant", description=main.__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser("save", help="quantize an inference directory's LLM and save it (inference.load reads it as is)")
  s.add_argument("--ckpt", required=True, help="a float inference directory (converted or exported)")
  s.add_argument("--quant", required=True, choices=QUANTS)
  s.add_argument("--out", required=True, help="the quantized inference directory to write")
  s.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                 help="compute dtype: the scales' and the float leaves' (inference.load's dtype)")
  a = p.parse_args(argv)
  found = layout.kind(a.ckpt)
  if found is None:
    p.error(f"--ckpt {layout.neither(a.ckpt)}")
  if found == "train":
    p.error(f"--ckpt {a.ckpt}: a train WORKDIR; export it first (python -m llamavid_jax.export --from-train)")
  if stored_quant(a.ckpt) is not None:
    p.error(f"--ckpt {a.ckpt}: already quantized {stored_quant(a.ckpt)}")
  if os.path.abspath(a.out) == os.path.abspath(a.ckpt) or layout.kind(a.out) is not None:
    p.error(f"--out {a.out}: holds a checkpoint already (write a new directory)")
  try:   # named in one line as inference.load names them (`cli.run`: exit 1)
    cfg = dataclasses.replace(orbax_io.load_config(a.ckpt), dtype=a.dtype)
  except Exception as e:   # noqa: BLE001  (JSONDecodeError, TypeError of an unknown field, ...)
    raise ValueError(f"{os.path.join(a.ckpt, orbax_io.MODEL_CONFIG)}: not a model config: {type(e).__name__}: "
                     f"{e}") from None
  try:
    params = reader(a.quant, a.dtype)(a.ckpt, None, cfg)
  except Exception as e:   # noqa: BLE001  (orbax / tensorstore on a torn or garbled parameter file)
    if "RESOURCE_EXHAUSTED" in str(e):
      raise
    raise ValueError(f"{a.ckpt}: corrupt or unreadable checkpoint (its parameters or their metadata, e.g. "
                     f"params/_METADATA): {type(e).__name__}: {e}") from None
  save(a.out, LlamaVid(cfg), params, a.quant, a.ckpt)
  print(f"{a.out}: LLM quantized {a.quant} ({a.dtype} scales), {param_bytes(params) / 2**20:.1f} MiB of parameters")


__all__ = ["QUANTS", "INT4_GROUP", "RECORD", "check", "check_stored", "quantize", "quantized_model", "reader",
           "restore", "save", "stored_quant", "param_bytes", "device_bytes"]


if __name__ == "__main__":
  cli.run(main)   # a known error: `error: <one line>`, exit 2 / 1 (--debug: the traceback)
