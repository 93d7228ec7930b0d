"""PyTorch references (transformers' modules) built from our tiny configs, and
their weights in the release's key layout so that our converter's table loads them."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tr

from llamavid_jax.checkpoint import mapping


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def rename(key: str, renames=()) -> str:
  for a, b in renames:
    key = key.replace(a, b)
  return key


def state(module: torch.nn.Module, renames=(), prefix="") -> dict[str, np.ndarray]:
  return {prefix + rename(k, renames): v.detach().numpy() for k, v in module.state_dict().items()}


def hf_vision(cfg, seed=0):
  v = cfg.vision
  m = tr.InstructBlipVisionModel(tr.InstructBlipVisionConfig(
      hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
      num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
      layer_norm_eps=v.ln_eps, hidden_act="gelu", qkv_bias=True, attention_dropout=0.0))
  randomize_(m, seed)
  with torch.no_grad():   # EVA has no key bias: transformers stores one qkv bias with a zero middle
    for layer in m.encoder.layers:
      d = v.width
      layer.self_attn.qkv.bias[d:2 * d] = 0.0
  return m.eval()


VISION_RENAMES = (("embeddings.class_embedding", "cls_token"), ("embeddings.patch_embedding.", "patch_embed.proj."),
                  ("embeddings.position_embedding", "pos_embed"), ("encoder.layers.", "blocks."),
                  ("self_attn.projection.", "attn.proj."), ("self_attn.", "attn."),
                  ("layer_norm1", "norm1"), ("layer_norm2", "norm2"))


def vision_state(m) -> dict[str, np.ndarray]:
  sd = state(m, VISION_RENAMES)
  for k in [k for k in sd if k.endswith("attn.qkv.bias")]:   # -> the release's q_bias / v_bias
    q, kb, v = np.split(sd.pop(k), 3)
    assert not kb.any()
    sd[k.replace("qkv.bias", "q_bias")], sd[k.replace("qkv.bias", "v_bias")] = q, v
  return {k: v for k, v in sd.items() if not k.startswith("post_layernorm")}


def load_vision_non_strict(m, sd: dict[str, np.ndarray]) -> list[str]:
  """LAVIS's `load_state_dict(strict=False)` of an eva_vit_g.pth dict into the
  transformers ViT `m` (q_bias, zero, v_bias -> its qkv bias); every parameter of `m`
  (but the unused post_layernorm) must be in `sd`. Returns the keys of `sd` not taken."""
  new, used = {}, set()
  for k, v in m.state_dict().items():
    key = rename(k, VISION_RENAMES)
    if key.startswith("post_layernorm"):
      new[k] = v
    elif key.endswith("attn.qkv.bias"):
      q, vb = (key.replace("qkv.bias", n) for n in ("q_bias", "v_bias"))
      new[k] = torch.from_numpy(np.concatenate([sd[q], np.zeros_like(sd[q]), sd[vb]]))
      used |= {q, vb}
    else:
      new[k] = torch.from_numpy(np.asarray(sd[key]))
      used.add(key)
  m.load_state_dict(new)
  return [k for k in sd if k not in used]


def hf_qformer(cfg, seed=0):
  q = cfg.qformer
  m = tr.InstructBlipQFormerModel(tr.InstructBlipQFormerConfig(
      vocab_size=q.vocab_size, hidden_size=q.hidden, num_hidden_layers=q.num_layers,
      num_attention_heads=q.num_heads, intermediate_size=q.mlp_dim, max_position_embeddings=q.max_positions,
      cross_attention_frequency=q.cross_attention_freq, encoder_hidden_size=q.vision_width,
      layer_norm_eps=q.ln_eps, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
  randomize_(m, seed)
  return m.eval()


QFORMER_RENAMES = (("embeddings.layernorm", "embeddings.LayerNorm"), (".attention.attention.", ".attention.self."),
                   (".crossattention.attention.", ".crossattention.self."))


def qformer_state(m) -> dict[str, np.ndarray]:
  sd = state(m, QFORMER_RENAMES, mapping.QFORMER_PREFIX)
  return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def hf_llama(cfg, seed=0):
  l = cfg.llm
  rope = {"rope_type": "linear", "factor": float(l.rope_scaling), "rope_theta": l.rope_theta} \
      if l.rope_scaling != 1.0 else {"rope_type": "default", "rope_theta": l.rope_theta}
  m = tr.LlamaForCausalLM(tr.LlamaConfig(
      vocab_size=l.vocab_size, hidden_size=l.d_model, intermediate_size=l.mlp_dim,
      num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
      rms_norm_eps=l.rms_eps, max_position_embeddings=l.max_positions, rope_parameters=rope,
      tie_word_embeddings=l.tie_embeddings, attention_bias=False, mlp_bias=False))
  randomize_(m, seed, std=0.1)
  return m.eval()
