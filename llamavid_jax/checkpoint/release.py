"""The release's `config.json` + weight shapes -> our `LlamaVidConfig`; tokenizers.

`config.json` carries the LLaMA fields and the multimodal ones (`mm_hidden_size`,
`mm_projector_type`, `compress_type`, `num_query`, `image_processor`,
`mm_vision_tower`). The Q-Former's and the ViT's sizes are not in it (the release
takes them from bert-base-uncased and hard-codes EVA-g): they are read off the
weights' keys and shapes, with head sizes 64 (Q-Former) and 88 (ViT).

336-pixel models: `eva_vit_g.pth` stores a 16x16 (+CLS) position embedding, which the
release interpolates bicubically to 24x24 at load time. We keep the stored tensor
(`VisionConfig(image_size=336, pos_embed_grid=16)`) and let the ViT interpolate on the
fly with torch's exact bicubic weights: export then writes back the original tensor
bit for bit, and the cost is one tiny matmul per forward.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from llamavid_jax.checkpoint import mapping
from llamavid_jax.models import config as C
from llamavid_jax.models import token_gen

VIT_HEAD_DIM = 88
QFORMER_HEAD_DIM = 64
LLM_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"not found: {path}")
  with open(path) as f:
    return json.load(f)


def image_size_from_processor(value: str | None) -> int:
  """The release's `image_processor` (a path like `.../clip-patch14-336`) -> 224 or 336:
  the processor config's crop size if the path exists here, else the size in its name."""
  if not value:
    return 224
  cfg = os.path.join(value, "preprocessor_config.json")
  if os.path.exists(cfg):
    crop = read_json(cfg).get("crop_size", 224)
    return int(crop["height"] if isinstance(crop, dict) else crop)
  m = re.search(r"(224|336|448)", os.path.basename(value.rstrip("/")))
  if not m:
    raise ValueError(f"image_processor {value!r}: cannot tell the image size; pass image_size")
  return int(m.group(1))


def _count(shapes, pattern: str) -> list[int]:
  r = re.compile(pattern)
  return sorted({int(m.group(1)) for k in shapes if (m := r.fullmatch(k))})


def _shape(shapes, key: str, file: str) -> tuple[int, ...]:
  if key not in shapes:
    raise KeyError(f"{file}: missing key {key!r}, needed to read the model's sizes")
  return tuple(shapes[key])


# EVA-CLIP's final LayerNorm and projection head: in the released eva_vit_g.pth, never
# built by LAVIS (nor the release), which loads the file non-strictly.
TOWER_TOP = ("norm.", "head.")


def vit_layout(shapes, depth: int | None = None, file: str = "eva_vit_g.pth") -> tuple[int, list[str]]:
  """-> (ViT depth to build, keys of the file it does not take).

  A file with the tower's final `norm.*` / `head.*` is the whole EVA-CLIP tower: as
  LAVIS, build one block less (the feature is the penultimate block's output) and
  ignore the last block, `norm` and `head`. `depth` overrides the depth; blocks from
  `depth` on are ignored then."""
  blocks = _count(shapes, r"blocks\.(\d+)\.attn\.qkv\.weight")
  if blocks != list(range(len(blocks))) or not blocks:
    raise ValueError(f"{file}: ViT blocks {blocks}: expected blocks.0 .. blocks.N-1")
  whole = any(k.startswith(TOWER_TOP) for k in shapes)
  if depth is None:
    depth = len(blocks) - 1 if whole and len(blocks) > 1 else len(blocks)
  if not 1 <= depth <= len(blocks):
    raise ValueError(f"{file}: ViT depth {depth} (--vit-depth): the file holds {len(blocks)} blocks")
  block = re.compile(r"blocks\.(\d+)\.")
  ignored = [k for k in shapes if k.startswith(TOWER_TOP) or ((m := block.match(k)) and int(m.group(1)) >= depth)]
  return depth, ignored


def ignored_summary(keys) -> str:
  """Ignored keys for a log line, each block's grouped: "blocks.39.* (16 tensors),
  norm.weight, norm.bias, head.weight, head.bias"."""
  groups: dict[str, int] = {}
  for k in keys:
    m = re.match(r"(blocks\.\d+\.)", k)
    g = m.group(1) + "*" if m else k
    groups[g] = groups.get(g, 0) + 1
  return ", ".join(f"{g} ({n} tensors)" if g.endswith("*") else g for g, n in groups.items())


def vision_config(shapes, image_size: int, head_dim: int = VIT_HEAD_DIM,
                  file: str = "eva_vit_g.pth", depth: int | None = None) -> C.VisionConfig:
  """EVA-ViT sizes from `eva_vit_g.pth` key shapes ({key: shape}); depth per `vit_layout`."""
  width, _, patch, _ = _shape(shapes, "patch_embed.proj.weight", file)
  depth, _ = vit_layout(shapes, depth, file)
  mlp = _shape(shapes, "blocks.0.mlp.fc1.weight", file)[0]
  n_pos = _shape(shapes, "pos_embed", file)[1] - 1
  g = int(round(n_pos ** 0.5))
  if g * g != n_pos or width % head_dim:
    raise ValueError(f"{file}: pos_embed of {n_pos} patches / width {width} do not fit a square "
                     f"grid / head size {head_dim}")
  return C.VisionConfig(image_size=image_size, patch_size=patch, width=width, depth=depth,
                        num_heads=width // head_dim, mlp_dim=mlp,
                        pos_embed_grid=None if g == image_size // patch else g)


def qformer_config(shapes, head_dim: int = QFORMER_HEAD_DIM, file: str = "model") -> C.QFormerConfig:
  """Q-Former sizes from the release's `model.vlm_att_*` key shapes."""
  p = mapping.QFORMER_PREFIX
  vocab, hidden = _shape(shapes, p + "embeddings.word_embeddings.weight", file)
  layers = _count(shapes, re.escape(p) + r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight")
  cross = _count(shapes, re.escape(p) + r"encoder\.layer\.(\d+)\.crossattention\.self\.query\.weight")
  if not layers or not cross or cross[0] != 0:
    raise ValueError(f"{file}: Q-Former layers {layers} with cross-attention in {cross}: expected "
                     "cross-attention from layer 0")
  freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
  if cross != list(range(0, len(layers), freq)) or len(layers) % freq:
    raise ValueError(f"{file}: cross-attention in layers {cross} of {len(layers)} is not every "
                     f"{freq}-th layer from 0")
  num_query = _shape(shapes, "model.vlm_att_query", file)[1]
  return C.QFormerConfig(
      vocab_size=vocab, hidden=hidden, num_layers=len(layers), num_heads=hidden // head_dim,
      mlp_dim=_shape(shapes, p + "encoder.layer.0.intermediate.dense.weight", file)[0],
      max_positions=_shape(shapes, p + "embeddings.position_embeddings.weight", file)[0],
      num_query=num_query, cross_attention_freq=freq,
      vision_width=_shape(shapes, p + "encoder.layer.0.crossattention.self.key.weight", file)[1])


def llm_config(hf: dict) -> C.LlmConfig:
  """LLaMA fields of an HF `config.json`: `rope_scaling` {type: linear, factor} (the
  release's transformers) or `rope_parameters` {rope_type, factor, rope_theta} (v5)."""
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  kind = rope.get("type", rope.get("rope_type", "default"))
  if kind not in ("default", "linear"):
    raise ValueError(f"config.json rope scaling {rope}: only linear scaling is supported")
  heads = hf["num_attention_heads"]
  return C.LlmConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      mlp_dim=hf["intermediate_size"], rms_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
      rope_scaling=float(rope.get("factor", 1.0)) if kind == "linear" else 1.0,
      max_positions=hf.get("max_position_embeddings", 2048),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def model_config(hf: dict, model_shapes, vit_shapes, *, image_size: int | None = None,
                 vit_head_dim: int = VIT_HEAD_DIM, qformer_head_dim: int = QFORMER_HEAD_DIM,
                 model_file: str = "config.json", vit_file: str = "eva_vit_g.pth",
                 vit_depth: int | None = None) -> C.LlamaVidConfig:
  """Release `config.json` dict + {key: shape} of the model dir and of the ViT file."""
  size = image_size or image_size_from_processor(hf.get("image_processor"))
  vision = vision_config(vit_shapes, size, vit_head_dim, vit_file, vit_depth)
  mm_hidden = hf.get("mm_hidden_size", vision.width)
  if mm_hidden != vision.width:
    raise ValueError(f"{model_file}: mm_hidden_size {mm_hidden} != ViT width {vision.width} "
                     f"of {vit_file}")
  use_context = "model.vlm_att_query" in model_shapes
  qformer = qformer_config(model_shapes, qformer_head_dim, model_file) if use_context else C.QFormerConfig()
  if use_context and qformer.vision_width != vision.width:
    raise ValueError(f"{model_file}: Q-Former cross-attention width {qformer.vision_width} != ViT "
                     f"width {vision.width} (a `vlm_att_bert_proj` model is not supported)")
  num_query = hf.get("num_query", qformer.num_query)
  if use_context and num_query != qformer.num_query:
    raise ValueError(f"{model_file}: num_query {num_query} but model.vlm_att_query holds "
                     f"{qformer.num_query}")
  return C.LlamaVidConfig(vision=vision, qformer=qformer, llm=llm_config(hf),
                          compress_type=token_gen.compress_from_release(hf.get("compress_type")),
                          mm_projector_type=hf.get("mm_projector_type", "linear"),
                          use_context_token=use_context)


def copy_llm_tokenizer(src: str, dst: str) -> list[str]:
  """Copies the LLaMA tokenizer files present in `src` to `dst`; needs tokenizer.model
  or tokenizer.json."""
  names = [n for n in LLM_TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
  if not {"tokenizer.model", "tokenizer.json"} & set(names):
    raise FileNotFoundError(f"{src}: no LLaMA tokenizer (tokenizer.model or tokenizer.json)")
  os.makedirs(dst, exist_ok=True)
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
  return names


def save_qformer_tokenizer(bert_dir: str, dst: str, vocab_size: int | None = None, exact: bool = True) -> int:
  """bert-base-uncased `vocab.txt` dir -> `dst` with `[DEC]` added as bos (as the
  release does); checks it fills the Q-Former's embedding (`exact`) or fits in it.
  Returns the vocab size."""
  from llamavid_jax.data.tokenizer import load_qformer_tokenizer
  tok = load_qformer_tokenizer(bert_dir)
  if vocab_size is not None and (len(tok) != vocab_size if exact else len(tok) > vocab_size):
    raise ValueError(f"{bert_dir}: BERT tokenizer with [DEC] has {len(tok)} tokens but the "
                     f"Q-Former's word embedding has {vocab_size} rows")
  tok.save_pretrained(dst)
  return len(tok)
