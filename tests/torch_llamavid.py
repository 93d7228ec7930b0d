"""An independent PyTorch LLaMA-VID forward, and a tiny checkpoint in the release layout.

The towers are transformers' modules (`tests/torch_ref.py`): InstructBlipVisionModel
(EVA-ViT), InstructBlipQFormerModel, LlamaForCausalLM. Token generation is plain
torch written after the release's `vlm_attention` / `token_generation`, and the
splice is the release's per-sample Python loop. None of it uses our Flax code, so the
converted checkpoint's Flax logits are checked against a separate implementation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import torch

from llamavid_jax.checkpoint import mapping
from llamavid_jax.models import config as C
from tests import torch_ref

IMAGE_TOKEN_INDEX = -200

BERT_WORDS = ("what is this the a in video cat dog runs on grass describe image two play with ball "
              "park ? . , happening who where color").split()
SP_LINES = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: what is in the video? ASSISTANT: a cat runs on the grass.",
    "USER: describe the image. ASSISTANT: two dogs play with a ball in the park.",
]


def tiny_config(llm_vocab: int, bert_vocab: int) -> C.LlamaVidConfig:
  """Real head sizes (ViT 88, Q-Former 64) so that the converter's size inference is exercised;
  the ViT's stored position grid is 2x2 (28 px) and the model runs at 42 px (3x3), as a
  336 model runs eva_vit_g's 16x16 grid at 24x24."""
  return C.LlamaVidConfig(
      vision=C.VisionConfig(image_size=42, patch_size=14, width=176, depth=2, num_heads=2, mlp_dim=64,
                            pos_embed_grid=2),
      qformer=C.QFormerConfig(vocab_size=bert_vocab, hidden=128, num_layers=4, num_heads=2, mlp_dim=64,
                              max_positions=64, num_query=4, cross_attention_freq=2, vision_width=176),
      llm=C.LlmConfig(vocab_size=llm_vocab, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=64, rms_eps=1e-5, rope_scaling=2.0, max_positions=512),
      compress_type="mean", mm_projector_type="mlp2x_gelu")


def stored_vision(cfg: C.LlamaVidConfig) -> C.LlamaVidConfig:
  """`cfg` with the ViT at the image size of its stored position grid."""
  v = cfg.vision
  return dataclasses.replace(cfg, vision=dataclasses.replace(v, image_size=v.patch_size * v.pos_embed_grid))


def eva_tower_state(cfg: C.LlamaVidConfig, extra_blocks: int = 1, seed: int = 5) -> dict[str, np.ndarray]:
  """The whole EVA-CLIP tower as eva_vit_g.pth ships it: `cfg.vision.depth + extra_blocks`
  blocks, then the final `norm.*` and a `head.*` (width -> 16)."""
  deep = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, depth=cfg.vision.depth + extra_blocks))
  sd = torch_ref.vision_state(torch_ref.hf_vision(stored_vision(deep), seed))
  rng, w = np.random.RandomState(seed), cfg.vision.width
  top = {"norm.weight": 1 + rng.randn(w), "norm.bias": rng.randn(w), "head.weight": rng.randn(16, w),
         "head.bias": rng.randn(16)}
  return sd | {k: (0.2 * v).astype(np.float32) if k != "norm.weight" else v.astype(np.float32)
               for k, v in top.items()}


def with_vit_from(ref: "TorchLlamaVid", vit_sd: dict[str, np.ndarray],
                  depth: int) -> tuple["TorchLlamaVid", list[str]]:
  """A copy of `ref` (same Q-Former, LLM, projectors) whose ViT of `depth` blocks is
  loaded from `vit_sd` as LAVIS does (non-strict) -> (copy, keys not taken)."""
  out = copy.copy(ref)
  out.cfg = dataclasses.replace(ref.cfg, vision=dataclasses.replace(ref.cfg.vision, depth=depth))
  out.vit = torch_ref.hf_vision(stored_vision(out.cfg))
  return out, torch_ref.load_vision_non_strict(out.vit, vit_sd)


class TorchLlamaVid:
  """The release's forward for one sample, from transformers' towers + plain torch."""

  def __init__(self, cfg: C.LlamaVidConfig, seed: int = 0):
    self.cfg = cfg
    self.vit = torch_ref.hf_vision(stored_vision(cfg), seed)
    self.qformer = torch_ref.hf_qformer(cfg, seed + 1)
    self.llama = torch_ref.hf_llama(cfg, seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.2
    q, cv, d = cfg.qformer, cfg.vision.width, cfg.llm.d_model
    self.extra = {   # release names -> tensors
        "model.vlm_att_query": rnd(1, q.num_query, q.hidden),
        "model.vlm_att_ln.weight": 1 + rnd(cv), "model.vlm_att_ln.bias": rnd(cv),
        "model.vlm_att_projector.weight": rnd(cv, q.hidden), "model.vlm_att_projector.bias": rnd(cv),
        "model.vlm_att_key_projector.weight": rnd(cv, cv), "model.vlm_att_key_projector.bias": rnd(cv),
        "model.vlm_att_val_projector.weight": rnd(d, cv), "model.vlm_att_val_projector.bias": rnd(d),
        "model.mm_projector.0.weight": rnd(d, cv), "model.mm_projector.0.bias": rnd(d),
        "model.mm_projector.2.weight": rnd(d, d), "model.mm_projector.2.bias": rnd(d),
    }

  def model_state(self) -> dict[str, np.ndarray]:
    """Every tensor of the release model directory (the ViT excluded)."""
    sd = torch_ref.state(self.llama) | torch_ref.qformer_state(self.qformer)
    return sd | {k: v.numpy() for k, v in self.extra.items()}

  def vit_state(self) -> dict[str, np.ndarray]:
    return torch_ref.vision_state(self.vit)

  def _lin(self, name, x):
    return x @ self.extra[f"model.{name}.weight"].T + self.extra[f"model.{name}.bias"]

  @torch.no_grad()
  def frame_tokens(self, frames: np.ndarray, instruction_ids: list[int]) -> torch.Tensor:
    """frames: float32[T, H, W, 3] -> float[T * 2, D] ([context, content] per frame)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    feats = self.vit(x, output_hidden_states=True,
                     interpolate_pos_encoding=frames.shape[1] != self.vit.config.image_size).hidden_states[-1]
    return self.tokens_from_features(feats, instruction_ids)

  @torch.no_grad()
  def tokens_from_features(self, feats: torch.Tensor, instruction_ids: list[int]) -> torch.Tensor:
    """feats: float[T, N+1, C] ViT output with CLS -> float[T * 2, D]. The Q-Former sees
    LayerNorm of all N+1 tokens, the context attention and the pooling the N patches."""
    return self._tokens(feats, feats[:, 1:], instruction_ids)

  @torch.no_grad()
  def movie_tokens_from_features(self, feats: torch.Tensor, instruction_ids: list[int]) -> torch.Tensor:
    """The release's long-video path (`vlm_attention(long_video=True)`): feats float[T, N, C]
    = the stored features without CLS (`video_info['feats'][:, 1:]`), for the Q-Former
    too; the question as every frame's instruction -> float[T * 2, D], frame t's
    [context, content] at rows 2t, 2t + 1 (`final_token.flatten(1, 2)`)."""
    return self._tokens(feats, feats, instruction_ids, block=64)

  def _tokens(self, qformer_in: torch.Tensor, patches: torch.Tensor, instruction_ids: list[int],
              block: int | None = None) -> torch.Tensor:
    """qformer_in float[T, N(+1), C] (before vlm_att_ln), patches float[T, N, C] ->
    float[T * 2, D]. `block`: the Q-Former runs `block` frames at a time (long video)."""
    t, q = patches.shape[0], self.cfg.qformer
    e = self.extra
    img = torch.nn.functional.layer_norm(qformer_in, (qformer_in.shape[-1],), e["model.vlm_att_ln.weight"],
                                         e["model.vlm_att_ln.bias"], eps=q.vision_ln_eps)
    ids = torch.tensor([instruction_ids] * t)
    mask = torch.ones(t, q.num_query + len(instruction_ids), dtype=torch.long)
    query = e["model.vlm_att_query"].expand(t, -1, -1)
    block = block or t
    out = torch.cat([self.qformer(input_ids=ids[i:i + block], attention_mask=mask[i:i + block],
                                  query_embeds=query[i:i + block], encoder_hidden_states=img[i:i + block]
                                  ).last_hidden_state[:, :q.num_query] for i in range(0, t, block)])
    text_q = self._lin("vlm_att_projector", out)                       # [T, M, C]
    scores = text_q @ self._lin("vlm_att_key_projector", patches).transpose(-1, -2) / patches.shape[-1] ** 0.5
    ctx = self._lin("vlm_att_val_projector", (scores.softmax(-1) @ patches).mean(1)[:, None])   # [T, 1, D]
    pooled = patches.mean(1, keepdim=True)                              # compress_type mean
    content = self._lin("mm_projector.2", torch.nn.functional.gelu(self._lin("mm_projector.0", pooled)))
    return torch.cat([ctx, content], 1).flatten(0, 1)

  @torch.no_grad()
  def logits(self, input_ids: list[int], visual: torch.Tensor) -> np.ndarray:
    """The release's splice loop (`prepare_inputs_labels_for_multimodal`) then LLaMA:
    input_ids with one -200 -> float32[S', V]."""
    ids = torch.tensor(input_ids)
    embed = self.llama.get_input_embeddings()
    pieces = []
    while (ids == IMAGE_TOKEN_INDEX).any():
      at = int(torch.where(ids == IMAGE_TOKEN_INDEX)[0][0])
      pieces += [embed(ids[:at]), visual]
      ids = ids[at + 1:]
    if ids.numel():
      pieces.append(embed(ids))
    return self.llama(inputs_embeds=torch.cat(pieces)[None]).logits[0].numpy()

  @torch.no_grad()
  def movie_logits(self, input_ids: list[int], visual: torch.Tensor) -> np.ndarray:
    """The release's long-video splice (`prepare_inputs_labels_for_multimodal`, long_video):
    input_ids with every frame's `<image>` repeated video_token = 2 times (2T ids -200
    among the subtitles' ids), visual float[2T, D] -> float32[S, V]: the text ids are
    embedded in place and the -200 positions, in order, take the rows of `visual`."""
    ids = torch.tensor(input_ids)
    is_img = ids == IMAGE_TOKEN_INDEX
    assert int(is_img.sum()) == visual.shape[0], (int(is_img.sum()), visual.shape)
    x = torch.empty(len(ids), self.cfg.llm.d_model)
    x[~is_img] = self.llama.get_input_embeddings()(ids[~is_img])
    x[torch.where(is_img)[0]] = visual
    return self.llama(inputs_embeds=x[None]).logits[0].numpy()


def release_config(cfg: C.LlamaVidConfig) -> dict:
  l = cfg.llm
  return {
      "architectures": ["LlavaLlamaAttForCausalLM"], "model_type": "llava", "torch_dtype": "float32",
      "hidden_size": l.d_model, "intermediate_size": l.mlp_dim, "num_hidden_layers": l.num_layers,
      "num_attention_heads": l.num_heads, "num_key_value_heads": l.num_kv_heads, "rms_norm_eps": l.rms_eps,
      "rope_theta": l.rope_theta, "rope_scaling": {"type": "linear", "factor": l.rope_scaling},
      "max_position_embeddings": l.max_positions, "vocab_size": l.vocab_size, "tie_word_embeddings": False,
      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
      "mm_hidden_size": cfg.vision.width, "mm_projector_type": cfg.mm_projector_type,
      "compress_type": cfg.compress_type, "num_query": cfg.qformer.num_query, "bert_type": "qformer_pretrain",
      "image_processor": "./llamavid/processor/clip-patch14-224", "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth",
      "mm_vision_select_feature": "patch", "mm_vision_select_layer": -1, "mm_use_im_start_end": False,
      "use_mm_proj": True, "image_aspect_ratio": "pad", "max_token": 2048,
  }


def write_sp_tokenizer(path: str) -> int:
  """A sentencepiece LLaMA tokenizer trained on a few lines -> `path`; returns vocab size."""
  import sentencepiece as spm
  os.makedirs(path, exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(SP_LINES * 20), model_prefix=os.path.join(path, "tokenizer"), vocab_size=120,
      model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      normalization_rule_name="identity", minloglevel=2, hard_vocab_limit=False)
  os.remove(os.path.join(path, "tokenizer.vocab"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True}, f)
  return spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model")).get_piece_size()


def write_bert_vocab(path: str) -> int:
  """bert-base-uncased-style `vocab.txt` -> `path`; returns the Q-Former vocab (+ [DEC])."""
  os.makedirs(path, exist_ok=True)
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(words) + "\n")
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
  return len(words) + 1


def save_bin_shards(sd: dict[str, np.ndarray], path: str, n_shards: int = 2) -> None:
  """torch.save shards `pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json`.
  Keys are dealt round robin, so every scanned stack gathers layers from all shards."""
  keys = list(sd)
  names = [f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin" for i in range(n_shards)]
  weight_map = {k: names[i % n_shards] for i, k in enumerate(keys)}
  for name in names:
    torch.save({k: torch.from_numpy(np.ascontiguousarray(sd[k])) for k in keys if weight_map[k] == name},
               os.path.join(path, name))
  with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": int(sum(v.nbytes for v in sd.values()))}, "weight_map": weight_map}, f)


def save_safetensors_shards(sd: dict[str, np.ndarray], path: str, n_shards: int = 2) -> None:
  from safetensors.numpy import save_file
  keys = list(sd)
  names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
  weight_map = {k: names[i % n_shards] for i, k in enumerate(keys)}
  for name in names:
    save_file({k: np.ascontiguousarray(sd[k]) for k in keys if weight_map[k] == name}, os.path.join(path, name),
              metadata={"format": "pt"})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


# Non-parameter buffers that real checkpoints carry (skipped by the converter).
BUFFERS = {
    mapping.QFORMER_PREFIX + "embeddings.position_ids": np.arange(64, dtype=np.int64)[None],
    "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
}


def write_release(root: str, ref: TorchLlamaVid, tokenizer_dir: str, *, fmt: str = "bin",
                  dtype=None, sd: dict | None = None) -> str:
  """A release model directory under `root`: config.json, 2 weight shards + index,
  tokenizer files. `dtype` casts floating tensors (e.g. ml_dtypes.bfloat16)."""
  os.makedirs(root, exist_ok=True)
  sd = dict(ref.model_state() | BUFFERS) if sd is None else sd
  if dtype is not None:
    sd = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in sd.items()}
  (save_bin_shards if fmt == "bin" else save_safetensors_shards)(sd, root)
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump(release_config(ref.cfg), f, indent=2)
  for n in os.listdir(tokenizer_dir):
    with open(os.path.join(tokenizer_dir, n), "rb") as src, open(os.path.join(root, n), "wb") as dst:
      dst.write(src.read())
  return root
