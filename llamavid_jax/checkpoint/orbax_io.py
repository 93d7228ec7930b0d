"""A checkpoint directory read and written: Orbax parameters + everything needed to run them.

The two layouts (an inference directory: params/, model_config.json, conversion.json,
tokenizer/, qformer_tokenizer/; a train WORKDIR: config.json, checkpoints/STEP/state, ...)
are named once, in `checkpoint.layout`.

`restore` reads the parameters of an inference directory straight into arrays sharded on
a mesh by the logical rules of `llamavid_jax.sharding` (each process reads only the
slices its devices hold), optionally cast to another dtype.

`save_inference` writes an inference directory: `convert` from a release, `train.train`
into WORKDIR/inference at the end of a run, `llamavid_jax.export --from-train` for any
saved step (conversion.json then holds the run's provenance instead of a release config).
`load_for_inference(DIR)` loads either that directory or a train WORKDIR itself
(WORKDIR/config.json, the run's ConfigDict, + the parameters of a step of
WORKDIR/checkpoints; tokenizers from its `data.llm_tokenizer` / `data.qformer_tokenizer`).
"""

from __future__ import annotations

import json
import os
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llamavid_jax import sharding as shd
from llamavid_jax.checkpoint import layout
from llamavid_jax.checkpoint.layout import (CONVERSION, MODEL_CONFIG, PARAMS, QFORMER_TOKENIZER, TOKENIZER,  # noqa: F401
                                            TRAIN_CHECKPOINTS, TRAIN_CONFIG, is_train_workdir)
from llamavid_jax.models import config as C
from llamavid_jax.models.llamavid import LlamaVid


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
    batch["features"] = jnp.zeros((1, 1, *cfg.feature_shape), jnp.float32)
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
  if jax.process_index() == 0:
    with open(os.path.join(out, MODEL_CONFIG), "w") as f:
      json.dump(C.to_dict(cfg), f, indent=2)
    with open(os.path.join(out, CONVERSION), "w") as f:
      json.dump(conversion, f, indent=1)


def save_inference(out: str, params, cfg: C.LlamaVidConfig, conversion: dict, llm_tokenizer: str,
                   qformer_tokenizer: str, exact_vocab: bool = True) -> None:
  """A self-contained directory (module docstring): the LLM tokenizer files of
  `llm_tokenizer`, the BERT one of `qformer_tokenizer` with `[DEC]`, then `save`.
  exact_vocab: the Q-Former tokenizer must fill its embedding (a release) rather than
  only fit in it (a model trained with a smaller tokenizer)."""
  from llamavid_jax.checkpoint import release
  if jax.process_index() == 0:
    vocab = cfg.qformer.vocab_size if cfg.use_context_token else None
    release.save_qformer_tokenizer(qformer_tokenizer, os.path.join(out, QFORMER_TOKENIZER), vocab, exact_vocab)
    release.copy_llm_tokenizer(llm_tokenizer, os.path.join(out, TOKENIZER))
  save(out, params, cfg, conversion)


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


def load_model_config(path: str) -> C.LlamaVidConfig:
  """The model config of an inference directory or a train WORKDIR, without its parameters."""
  found = layout.kind(path)
  if found is None:
    raise FileNotFoundError(layout.neither(path))
  return load_config(path) if found == "inference" else C.from_dict(read_train_config(path)["model"])


def load_conversion(ckpt: str) -> dict:
  path = os.path.join(ckpt, CONVERSION)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{ckpt}: no {CONVERSION}")
  with open(path) as f:
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
      params = _restore_numpy(os.path.join(ckpt, PARAMS), stored)
      return params if dtype is None else jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
    shardings = shd.param_shardings(boxed, mesh, rules)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), dtype or m.dtype, sharding=s),
                          stored, shardings)
    return checkpointer.restore(os.path.join(ckpt, PARAMS), target)
  finally:
    checkpointer.close()


class Inference(typing.NamedTuple):
  """What running a model needs, from `load_for_inference`."""
  cfg: C.LlamaVidConfig
  params: dict
  tokenizer: typing.Any            # the LLM tokenizer (transformers)
  qformer_tokenizer: typing.Any    # BERT with [DEC], left truncation
  meta: dict                       # conversion.json, or the train run's provenance


def read_train_config(workdir: str) -> dict:
  """WORKDIR/config.json (train.train's ConfigDict as JSON) -> dict."""
  path = os.path.join(workdir, TRAIN_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir}: not a train.train WORKDIR (no {TRAIN_CONFIG}: the run's config is "
                            "written there at its start)")
  with open(path) as f:
    return json.load(f)


def train_tokenizers(workdir: str, train_cfg: dict) -> tuple[str, str]:
  """The (LLM, Q-Former) tokenizer directories a run used: its data.llm_tokenizer and
  data.qformer_tokenizer (relative paths: from the working directory)."""
  out = []
  for key in ("llm_tokenizer", "qformer_tokenizer"):
    path = (train_cfg.get("data") or {}).get(key)
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(f"{os.path.join(workdir, TRAIN_CONFIG)}: data.{key}={path!r}: no such directory")
    out.append(path)
  return out[0], out[1]


def train_step(workdir: str, step: int | None = None) -> int:
  """`step` (checked to be saved) or the latest step of WORKDIR/checkpoints."""
  ckdir = os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINTS)
  steps = layout.saved_steps(workdir)
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f"{ckdir}: no checkpoint of step {step if step is not None else '(any)'}; "
                            f"saved steps: {steps}")
  return steps[-1] if step is None else step


def restore_train_params(workdir: str, step: int, dtype=None) -> dict:
  """The parameters of a train checkpoint (`state/params` of WORKDIR/checkpoints/STEP),
  as host numpy, without reading the optimizer state."""
  ocp = _ocp()
  path = os.path.join(layout.step_dir(os.path.abspath(workdir), step), layout.STATE)
  with ocp.PyTreeCheckpointer() as ckpt:
    meta = ckpt.metadata(path).item_metadata.tree["params"]
  params = _restore_numpy(path, {"params": meta}, partial=True)["params"]
  return params if dtype is None else jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)


def iter_params(path: str, *, step: int | None = None, dtype=None, check: bool = True, device: bool = False,
                place=None):
  """(leaf path, array) of every parameter of an inference directory or of a train
  WORKDIR's `step` (default the latest), read one leaf at a time (an Orbax partial
  restore each, the largest first): a caller that keeps only a transformed copy of each
  leaf (quantization) never holds more than one stored leaf. `dtype`: floating leaves cast
  to it (integer leaves, a quantized checkpoint's, never are); `device`: jax.Arrays on
  the default device, read straight into it, else host numpy; `place(leaf path)` -> a
  Sharding: jax.Arrays read straight onto it (each device reads its slices). `check`: an inference
  directory's tree is checked against its model config first."""
  import flax
  ocp = _ocp()
  path = os.path.abspath(path)
  if layout.kind(path) == "inference":
    item, stored = os.path.join(path, PARAMS), stored_metadata(path)
    if check:
      _prune(abstract_params(load_config(path)), stored)
    wrap, unwrap = (lambda t: t), (lambda t: t)
  else:
    item = os.path.join(layout.step_dir(path, train_step(path, step)), layout.STATE)
    with ocp.PyTreeCheckpointer() as ckpt:
      stored = ckpt.metadata(item).item_metadata.tree["params"]
    wrap, unwrap = (lambda t: {"params": t}), (lambda t: t["params"])
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.PyTreeCheckpointer() as ckpt:
    # largest first: a caller that keeps a smaller copy of each (quantization) reads the
    # big leaves, whose reads and transforms take the most, while it holds the least
    leaves = flax.traverse_util.flatten_dict(stored).items()
    for key, meta in sorted(leaves, key=lambda kv: -int(np.prod(kv[1].shape)) * np.dtype(kv[1].dtype).itemsize):
      want = meta.dtype if dtype is None or not jnp.issubdtype(meta.dtype, jnp.floating) else jnp.dtype(dtype)
      if device or place is not None:
        at = dev if place is None else place(key)
        one, args = jax.ShapeDtypeStruct(tuple(meta.shape), want, sharding=at), ocp.ArrayRestoreArgs(sharding=at,
                                                                                                    dtype=want)
      else:
        one, args = np.zeros((), meta.dtype), ocp.RestoreArgs(restore_type=np.ndarray, dtype=want)
      tree = flax.traverse_util.unflatten_dict({key: one})
      restore_args = flax.traverse_util.unflatten_dict({key: args})
      got = ckpt.restore(item, args=ocp.args.PyTreeRestore(item=wrap(tree), restore_args=wrap(restore_args),
                                                           partial_restore=True))
      leaf = flax.traverse_util.flatten_dict(unwrap(got))[key]
      del got
      yield key, leaf
      del leaf   # the caller's now: not held while the next leaf is read


def _restore_numpy(path: str, meta, partial: bool = False):
  """The arrays of `meta`'s tree (orbax metadata) at `path` as host numpy, whatever the
  devices they were saved from: a checkpoint written by 8 (or 256) devices restores in a
  1-device process (without restore_type, orbax rebuilds the saved shardings and refuses
  a different topology)."""
  ocp = _ocp()
  item = jax.tree.map(lambda m: np.zeros((), m.dtype), meta)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as ckpt:
    return ckpt.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=partial))


def data_provenance(data) -> dict:
  """What inference repeats of a run's training data (a data config dict): the image
  aspect rule and the frame sampling (`llamavid_jax.data.frames`: fps None = every
  frame; max_frames = the uniform cap). A release checkpoint has none of these keys:
  inference then uses the release's rule (pad, 1 fps, no cap)."""
  data = data or {}
  if data.get("kind") == "toy":   # random batches: no media was ever sampled
    return dict(image_aspect_ratio="pad", video_fps=1.0, max_frames=None)
  return dict(image_aspect_ratio=data.get("image_aspect", "pad"), video_fps=data.get("video_fps", 1.0),
              max_frames=data.get("max_frames"))


def train_provenance(workdir: str, step: int, train_cfg: dict) -> dict:
  """conversion.json of an inference directory made from a train run."""
  return dict(source="train.train", workdir=os.path.abspath(workdir), step=step,
              **data_provenance(train_cfg.get("data")))


def save_from_train(out: str, workdir: str, train_cfg: dict, step: int, params=None) -> None:
  """An inference directory (`save_inference`) of a train run's `step`: `params`, or
  (None) those of WORKDIR/checkpoints/STEP; tokenizers per `train_tokenizers`."""
  llm_dir, q_dir = train_tokenizers(workdir, train_cfg)
  cfg = C.from_dict(train_cfg["model"])
  params = restore_train_params(workdir, step) if params is None else params
  save_inference(out, params, cfg, train_provenance(workdir, step, train_cfg), llm_dir, q_dir, exact_vocab=False)


def load_for_inference(path: str, *, step: int | None = None, dtype=None,
                       mesh: jax.sharding.Mesh | None = None, read_params=None) -> Inference:
  """A converted / inference directory, or a train WORKDIR (its `step`, default the
  latest) -> `Inference`. Missing files are named before any parameter is read.
  `read_params(path, step, cfg)`, when given, reads the parameters instead (the
  quantizing loader of `llamavid_jax.quant`: leaf by leaf)."""
  from llamavid_jax.data.tokenizer import load_llm_tokenizer, load_qformer_tokenizer
  found = layout.kind(path)
  if found == "inference":
    cfg, meta = load_config(path), load_conversion(path)
    llm_dir, q_dir = os.path.join(path, TOKENIZER), os.path.join(path, QFORMER_TOKENIZER)
    load = lambda: restore(path, mesh, dtype, cfg=cfg)
  elif found == "train":
    train_cfg = read_train_config(path)
    cfg, step = C.from_dict(train_cfg["model"]), train_step(path, step)
    llm_dir, q_dir = train_tokenizers(path, train_cfg)
    meta = train_provenance(path, step, train_cfg)
    def load():   # restored on the host, then placed by the logical rules
      params = restore_train_params(path, step, dtype)
      if mesh is None:
        return params
      return jax.device_put(params, shd.param_shardings(_prune(abstract_params(cfg), params), mesh))
  else:
    raise FileNotFoundError(layout.neither(path))
  tok = load_llm_tokenizer(llm_dir)
  qtok = load_qformer_tokenizer(q_dir, max_length=cfg.qformer.max_text_len)
  return Inference(cfg, load() if read_params is None else read_params(path, step, cfg), tok, qtok, meta)
