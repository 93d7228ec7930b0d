"""A converted checkpoint directory: Orbax parameters + everything needed to run them.

    OUT/params/              Orbax (StandardCheckpointer) tree of the parameters
    OUT/model_config.json    our LlamaVidConfig (`config.to_dict`)
    OUT/conversion.json      provenance: the release config.json, each torch key's
                             source dtype (for a bit-exact export), skipped tensors
    OUT/tokenizer/           the LLaMA tokenizer files
    OUT/qformer_tokenizer/   the BERT tokenizer with `[DEC]`

`restore` reads the parameters straight into arrays sharded on a mesh by the logical
rules of `llamavid_jax.sharding` (each process reads only the slices its devices
hold), optionally cast to another dtype.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llamavid_jax import sharding as shd
from llamavid_jax.models import config as C
from llamavid_jax.models.llamavid import LlamaVid

PARAMS, MODEL_CONFIG, CONVERSION = "params", "model_config.json", "conversion.json"
TOKENIZER, QFORMER_TOKENIZER = "tokenizer", "qformer_tokenizer"


def _ocp():
  import orbax.checkpoint as ocp
  return ocp


def dummy_batch(cfg: C.LlamaVidConfig, frames: bool = True) -> dict:
  """Smallest batch that touches every parameter (ViT included when `frames`)."""
  s = cfg.vision.image_size
  batch = dict(input_ids=jnp.array([[1, cfg.image_token_id]], jnp.int32), text_mask=jnp.ones((1, 2), bool),
               frame_mask=jnp.ones((1, 1), bool), qformer_ids=jnp.ones((1, 2), jnp.int32),
               qformer_mask=jnp.ones((1, 2), bool))
  if frames:
    batch["frames"] = jnp.zeros((1, 1, s, s, 3), jnp.float32)
  else:
    batch["features"] = jnp.zeros((1, 1, cfg.vision.num_tokens, cfg.vision.width), jnp.float32)
  return batch


def abstract_params(cfg: C.LlamaVidConfig):
  """The boxed (nn.Partitioned) abstract parameter tree of the whole model, ViT included."""
  model = LlamaVid(cfg)
  return jax.eval_shape(lambda k: model.init(k, **dummy_batch(cfg)), jax.random.key(0))["params"]


def shape_tree(cfg: C.LlamaVidConfig):
  """{...: tuple shape} of every parameter."""
  return jax.tree.map(lambda x: tuple(x.shape), nn.unbox(abstract_params(cfg)))


def save(out: str, params, cfg: C.LlamaVidConfig, conversion: dict, concurrent_gb: int = 1) -> None:
  """Writes params (numpy or jax leaves) with Orbax, plus the two JSON files.
  Orbax buffers what it is writing; `concurrent_gb` bounds that (default: all leaves
  at once, i.e. a second copy of the model)."""
  ocp = _ocp()
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  _to_jax_in_place(params)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=concurrent_gb)) as ckpt:
    ckpt.save(os.path.join(out, PARAMS), args=ocp.args.StandardSave(params), force=True)
  with open(os.path.join(out, MODEL_CONFIG), "w") as f:
    json.dump(C.to_dict(cfg), f, indent=2)
  with open(os.path.join(out, CONVERSION), "w") as f:
    json.dump(conversion, f, indent=1)


def _to_jax_in_place(tree: dict) -> None:
  """numpy leaves -> jax.Arrays one at a time, dropping each numpy leaf as it goes:
  Orbax would otherwise copy every numpy leaf at once (a second copy of the model)."""
  for k, v in tree.items():
    if isinstance(v, dict):
      _to_jax_in_place(v)
    elif isinstance(v, np.ndarray):
      tree[k] = None
      tree[k] = jnp.asarray(v)
      del v


def load_config(ckpt: str) -> C.LlamaVidConfig:
  path = os.path.join(ckpt, MODEL_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{ckpt}: not a converted checkpoint (no {MODEL_CONFIG})")
  with open(path) as f:
    return C.from_dict(json.load(f))


def load_conversion(ckpt: str) -> dict:
  with open(os.path.join(ckpt, CONVERSION)) as f:
    return json.load(f)


def stored_metadata(ckpt: str):
  """Tree of orbax ArrayMetadata (shape, dtype) of the stored parameters."""
  ckpt_ = _ocp().StandardCheckpointer()
  return ckpt_.metadata(os.path.join(os.path.abspath(ckpt), PARAMS)).item_metadata.tree


def _prune(boxed, stored, path=()):
  """`boxed` restricted to the keys of `stored`; errors name path and both shapes."""
  if isinstance(stored, dict):
    if not isinstance(boxed, dict):
      raise ValueError(f"checkpoint has a subtree at {'/'.join(path)} where the model has a leaf")
    out = {}
    for k, v in stored.items():
      if k not in boxed:
        raise ValueError(f"checkpoint parameter {'/'.join(path + (k,))} is not in the model")
      out[k] = _prune(boxed[k], v, path + (k,))
    return out
  want = tuple(nn.unbox(boxed).shape)
  if tuple(stored.shape) != want:
    raise ValueError(f"checkpoint parameter {'/'.join(path)}: stored shape {tuple(stored.shape)}, "
                     f"the model expects {want}")
  return boxed


def restore(ckpt: str, mesh: jax.sharding.Mesh | None = None, dtype=None, rules=shd.LOGICAL_RULES,
            cfg: C.LlamaVidConfig | None = None):
  """Parameters of a converted checkpoint.

  Args:
    ckpt: the converted directory (OUT).
    mesh: restore into jax.Arrays sharded on this mesh by `rules` (every leaf's
      `arr.sharding.spec` is `fit_spec(logical_to_spec(names))`); None -> host numpy.
    dtype: cast every leaf (e.g. jnp.bfloat16); None keeps the stored dtypes.
  Returns:
    the params tree (unboxed), containing exactly the stored leaves.
  """
  ocp = _ocp()
  ckpt = os.path.abspath(ckpt)
  cfg = cfg or load_config(ckpt)
  stored = stored_metadata(ckpt)
  boxed = _prune(abstract_params(cfg), stored)
  checkpointer = ocp.StandardCheckpointer()
  try:
    if mesh is None:
      params = checkpointer.restore(os.path.join(ckpt, PARAMS))
      return params if dtype is None else jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
    shardings = shd.param_shardings(boxed, mesh, rules)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), dtype or m.dtype, sharding=s),
                          stored, shardings)
    return checkpointer.restore(os.path.join(ckpt, PARAMS), target)
  finally:
    checkpointer.close()
