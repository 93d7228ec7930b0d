"""The one table between our parameter tree and the release's PyTorch names.

Release layout (DESIGN.md §2): the LLM, projectors and Q-Former live in the HF model
directory (`model.layers.*`, `model.vlm_att_encoder.bert.*` with LAVIS BERT names,
...); the ViT lives in `eva_vit_g.pth` (`blocks.{i}.attn.qkv.weight`, ...).
`rules(cfg)` lists, for every torch key, where it goes in our tree and how the
tensor is laid out; `to_flax` and `to_torch` apply it in both directions exactly
(transposes and reshapes only, so a round trip is bit-identical).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from llamavid_jax.models import token_gen
from llamavid_jax.models.config import LlamaVidConfig

VIT_PREFIX = ""                       # keys of eva_vit_g.pth
QFORMER_PREFIX = "model.vlm_att_encoder.bert."


@dataclasses.dataclass(frozen=True)
class Rule:
  path: tuple[str, ...]     # leaf path in our params
  layer: int | None         # index along the scanned `layers` axis, or None
  kind: str                 # "linear" (torch [out, in]), "conv", "raw"
  n_in: int = 1             # number of input dims of a DenseGeneral kernel


def _linear(rules, key, path, layer=None, n_in=1, bias=True):
  rules[key + ".weight"] = Rule(path + ("kernel",), layer, "linear", n_in)
  if bias:
    rules[key + ".bias"] = Rule(path + ("bias",), layer, "raw")


def _norm(rules, key, path, layer=None, bias=True, scale_name="scale"):
  rules[key + ".weight"] = Rule(path + (scale_name,), layer, "raw")
  if bias:
    rules[key + ".bias"] = Rule(path + ("bias",), layer, "raw")


def vit_rules(cfg: LlamaVidConfig, prefix: str = VIT_PREFIX) -> dict[str, Rule]:
  r: dict[str, Rule] = {}
  root = ("vit",)
  r[prefix + "patch_embed.proj.weight"] = Rule(root + ("patch_embed", "kernel"), None, "conv")
  r[prefix + "patch_embed.proj.bias"] = Rule(root + ("patch_embed", "bias"), None, "raw")
  r[prefix + "cls_token"] = Rule(root + ("cls_token",), None, "raw")
  r[prefix + "pos_embed"] = Rule(root + ("pos_embed",), None, "raw")
  b = root + ("blocks",)
  for i in range(cfg.vision.depth):
    k = f"{prefix}blocks.{i}."
    _norm(r, k + "norm1", b + ("norm1",), i)
    _linear(r, k + "attn.qkv", b + ("qkv",), i, bias=False)
    r[k + "attn.q_bias"] = Rule(b + ("q_bias",), i, "raw")
    r[k + "attn.v_bias"] = Rule(b + ("v_bias",), i, "raw")
    _linear(r, k + "attn.proj", b + ("proj",), i, n_in=2)
    _norm(r, k + "norm2", b + ("norm2",), i)
    _linear(r, k + "mlp.fc1", b + ("fc1",), i)
    _linear(r, k + "mlp.fc2", b + ("fc2",), i)
  return r


def qformer_rules(cfg: LlamaVidConfig, prefix: str = QFORMER_PREFIX) -> dict[str, Rule]:
  r: dict[str, Rule] = {}
  root, q = ("qformer",), cfg.qformer
  r["model.vlm_att_query"] = Rule(root + ("query_tokens",), None, "raw")
  _norm(r, "model.vlm_att_ln", root + ("vision_ln",))
  r[prefix + "embeddings.word_embeddings.weight"] = Rule(root + ("word_embeddings", "embedding"), None, "raw")
  r[prefix + "embeddings.position_embeddings.weight"] = Rule(root + ("position_embeddings",), None, "raw")
  _norm(r, prefix + "embeddings.LayerNorm", root + ("embed_ln",))
  for l in range(q.num_layers):
    g, sub = divmod(l, q.cross_attention_freq)
    k, p = f"{prefix}encoder.layer.{l}.", root + ("layers", f"layer_{sub}")
    attn = [("attention", "attention")] + ([("crossattention", "crossattention")] if sub == 0 else [])
    for tname, fname in attn:
      for proj in ("query", "key", "value"):
        _linear(r, f"{k}{tname}.self.{proj}", p + (fname, proj), g)
      _linear(r, f"{k}{tname}.output.dense", p + (fname, "out"), g, n_in=2)
      _norm(r, f"{k}{tname}.output.LayerNorm", p + (fname, "ln"), g)
    for suffix, fname in (("", "ffn"), ("_query", "ffn_query")):
      _linear(r, f"{k}intermediate{suffix}.dense", p + (fname, "intermediate"), g)
      _linear(r, f"{k}output{suffix}.dense", p + (fname, "output"), g)
      _norm(r, f"{k}output{suffix}.LayerNorm", p + (fname, "ln"), g)
  return r


def projector_rules(cfg: LlamaVidConfig) -> dict[str, Rule]:
  r: dict[str, Rule] = {}
  root = ("token_gen",)
  if cfg.use_context_token:
    for name in ("vlm_att_projector", "vlm_att_key_projector", "vlm_att_val_projector"):
      _linear(r, f"model.{name}", root + (name,))
  for name, key in token_gen.projector(cfg.mm_projector_type).layers:
    _linear(r, f"model.{key}", root + ("mm_projector", name))
  return r


def llm_rules(cfg: LlamaVidConfig) -> dict[str, Rule]:
  r: dict[str, Rule] = {}
  root = ("llm",)
  r["model.embed_tokens.weight"] = Rule(root + ("embed_tokens", "embedding"), None, "raw")
  for i in range(cfg.llm.num_layers):
    k, p = f"model.layers.{i}.", root + ("layers",)
    for n in ("q_proj", "k_proj", "v_proj"):
      _linear(r, f"{k}self_attn.{n}", p + (n,), i, bias=False)
    _linear(r, f"{k}self_attn.o_proj", p + ("o_proj",), i, n_in=2, bias=False)
    for n in ("gate_proj", "up_proj", "down_proj"):
      _linear(r, f"{k}mlp.{n}", p + (n,), i, bias=False)
    _norm(r, f"{k}input_layernorm", p + ("input_norm",), i, bias=False)
    _norm(r, f"{k}post_attention_layernorm", p + ("post_attention_norm",), i, bias=False)
  _norm(r, "model.norm", root + ("norm",), bias=False)
  if not cfg.llm.tie_embeddings:
    _linear(r, "lm_head", root + ("lm_head",), bias=False)
  return r


def model_rules(cfg: LlamaVidConfig) -> dict[str, Rule]:
  """Every key of the release's HF model directory (all but the ViT)."""
  out = llm_rules(cfg) | projector_rules(cfg)
  if cfg.use_context_token:
    out |= qformer_rules(cfg)
  return out


def _to_flax_leaf(t: np.ndarray, rule: Rule, shape: tuple[int, ...]) -> np.ndarray:
  want = torch_shape(rule, shape)
  if tuple(t.shape) != want:
    raise ValueError(f"expected torch shape {want}")
  if rule.kind == "linear":
    t = t.T
  elif rule.kind == "conv":           # [D, C, p, p] -> [p, p, C, D]
    t = t.transpose(2, 3, 1, 0)
  if t.size != int(np.prod(shape)):
    raise ValueError(f"size mismatch: torch shape {tuple(t.shape)} cannot become {shape}")
  return np.ascontiguousarray(t).reshape(shape)


def _to_torch_leaf(x: np.ndarray, rule: Rule) -> np.ndarray:
  if rule.kind == "linear":
    n_in = int(np.prod(x.shape[:rule.n_in]))
    return np.ascontiguousarray(x.reshape(n_in, -1).T)
  if rule.kind == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  return x.reshape(torch_shape(rule, x.shape))   # raw: 1-D biases / norms, others as they are


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def leaf_shape(shapes, rule: Rule) -> tuple[int, ...]:
  """Shape of one layer's slice of the leaf that `rule` fills."""
  s = tuple(_get(shapes, rule.path))
  return s[1:] if rule.layer is not None else s


def to_flax(rules: Mapping[str, Rule], get: Callable[[str], np.ndarray], shapes) -> dict:
  """Builds the parameter subtree covered by `rules`. `get(key)` returns the torch
  tensor as a numpy array; `shapes` is our tree of leaf shapes (from jax.eval_shape).
  Raises naming the key and both shapes on any mismatch."""
  params: dict = {}
  stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  for key, rule in rules.items():
    want = leaf_shape(shapes, rule)
    t = np.asarray(get(key))
    try:
      leaf = _to_flax_leaf(t, rule, want)
    except ValueError as e:
      raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} does not fit our {rule.path} "
                       f"of shape {want} ({e})") from None
    if rule.layer is None:
      _set(params, rule.path, leaf)
    else:
      stacks.setdefault(rule.path, {})[rule.layer] = leaf
  for path, layers in stacks.items():
    _set(params, path, np.stack([layers[i] for i in range(len(layers))]))
  return params


def iter_torch(rules: Mapping[str, Rule], params) -> Iterator[tuple[str, np.ndarray]]:
  """(torch key, numpy tensor) for every rule, from our params (numpy leaves)."""
  for key, rule in rules.items():
    leaf = np.asarray(_get(params, rule.path))
    if rule.layer is not None:
      leaf = leaf[rule.layer]
    yield key, _to_torch_leaf(leaf, rule)


def torch_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch tensor shape that `rule` turns into our (per-layer) leaf `shape`;
  the exact inverse of `_to_torch_leaf`'s layout."""
  if rule.kind == "linear":
    return (int(np.prod(shape[rule.n_in:])), int(np.prod(shape[:rule.n_in])))
  if rule.kind == "conv":             # [p, p, C, D] -> [D, C, p, p]
    return (shape[3], shape[2], shape[0], shape[1])
  if rule.path[-1] in ("bias", "scale", "q_bias", "v_bias"):
    return (int(np.prod(shape)),)
  return tuple(shape)


# Tensors of the release files that are buffers, not parameters: skipped by name,
# counted and logged. Anything else without a rule is an error.
NON_PARAMETER_SUFFIXES = (
    "embeddings.position_ids",        # BERT position-id buffer (Q-Former)
    "rotary_emb.inv_freq",            # LLaMA RoPE frequencies (older transformers saves)
)


def is_non_parameter(key: str) -> bool:
  return key.endswith(NON_PARAMETER_SUFFIXES)


# InstructBLIP `instruct_blip_vicuna7b_trimmed.pth` ("model" dict) -> the release's
# names, as the release's `initialize_attention_modules(pretrain_qformer=...)` loads it:
# only the BERT encoder, the query tokens and `ln_vision` are used.
INSTRUCTBLIP_RENAMES = (
    ("Qformer.bert.", QFORMER_PREFIX),
    ("query_tokens", "model.vlm_att_query"),
    ("ln_vision.", "model.vlm_att_ln."),
)


def instructblip_key(key: str) -> str | None:
  """Release key for an InstructBLIP checkpoint key, or None if the release ignores it
  (`llm_proj`, `Qformer.cls`, the ViT copy, ...)."""
  for src, dst in INSTRUCTBLIP_RENAMES:
    if key.startswith(src):
      return dst + key[len(src):]
  return None
