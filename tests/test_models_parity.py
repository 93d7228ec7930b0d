"""Parity of every tower with transformers' PyTorch modules (same weights, fp32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from llamavid_jax.checkpoint import mapping
from configs import tiny
from llamavid_jax.models import config as C
from llamavid_jax.models.eva_vit import EvaViT, bicubic_matrix
from llamavid_jax.models.llama import Llama
from llamavid_jax.models.llamavid import LlamaVid
from llamavid_jax.models.qformer import QFormer
from llamavid_jax.models.token_gen import TokenGenerator, pool_content
from tests import torch_ref

TOL = 1e-4


def shapes_of(module, *args, root, method=None):
  abstract = jax.eval_shape(lambda r, *a: module.init(r, *a, method=method), jax.random.key(0), *args)
  return {root: jax.tree.map(lambda x: x.shape, nn.unbox(abstract["params"]))}


def load(rules, sd, shapes, root):
  missing = set(sd) ^ set(rules)
  assert not missing, f"keys not covered by the table: {sorted(missing)}"
  return mapping.to_flax(rules, sd.__getitem__, shapes)[root]


def report(name, diff):
  print(f"PARITY {name}: max abs diff {diff:.3e}")
  assert diff <= TOL, f"{name}: {diff}"


@pytest.mark.parametrize("image_size", [56, 84])   # 84: pos-embed 4x4 -> 6x6 (as 224 -> 336)
def test_vit_matches_instructblip_vision(tiny_cfg, image_size):
  m = tiny.get_config().model
  m.vision.image_size = 56
  cfg = C.from_dict(m)
  ref = torch_ref.hf_vision(cfg)
  sd = torch_ref.vision_state(ref)
  vit = EvaViT(dataclasses.replace(cfg.vision, image_size=image_size, pos_embed_grid=4), remat_policy="none")
  x = np.random.RandomState(0).randn(2, image_size, image_size, 3).astype(np.float32)
  params = load(mapping.vit_rules(cfg), sd, shapes_of(vit, x, root="vit"), "vit")
  ours = vit.apply({"params": params}, x)
  with torch.no_grad():
    hs = ref(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True,
             interpolate_pos_encoding=image_size != 56).hidden_states[-1].numpy()
  assert ours.shape == hs.shape == (2, (image_size // 14) ** 2 + 1, cfg.vision.width)
  report(f"vit@{image_size}", float(np.abs(ours - hs).max()))


def test_bicubic_matches_torch_interpolate():
  x = np.random.RandomState(1).randn(1, 3, 16, 16)
  want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(24, 24), mode="bicubic",
                                         align_corners=False).numpy()
  w = bicubic_matrix(16, 24)
  got = np.einsum("ih,bchw,jw->bcij", w, x, w)
  assert np.abs(got - want).max() < 1e-12


def test_qformer_matches_instructblip_qformer(tiny_cfg):
  m = tiny.get_config().model
  m.qformer.num_layers, m.qformer.vision_width, m.vision.width = 4, 24, 24
  cfg = C.from_dict(m)
  q = cfg.qformer
  ref = torch_ref.hf_qformer(cfg)
  sd = torch_ref.qformer_state(ref)
  rng = np.random.RandomState(0)
  sd["model.vlm_att_query"] = rng.randn(1, q.num_query, q.hidden).astype(np.float32)
  sd["model.vlm_att_ln.weight"] = (1 + 0.3 * rng.randn(q.vision_width)).astype(np.float32)
  sd["model.vlm_att_ln.bias"] = (0.3 * rng.randn(q.vision_width)).astype(np.float32)
  ids = rng.randint(1, q.vocab_size, (3, 7)).astype(np.int32)
  mask = np.ones((3, 7), bool)
  mask[1, 5:] = False
  mask[2, 2:] = False
  image = rng.randn(3, 5, q.vision_width).astype(np.float32)
  model = QFormer(q, remat_policy="none")
  params = load(mapping.qformer_rules(cfg), sd, shapes_of(model, ids, mask, image, root="qformer"), "qformer")
  ours = model.apply({"params": params}, ids, mask, image)
  with torch.no_grad():
    img = torch.nn.functional.layer_norm(torch.from_numpy(image), (q.vision_width,),
                                         torch.from_numpy(sd["model.vlm_att_ln.weight"]),
                                         torch.from_numpy(sd["model.vlm_att_ln.bias"]), eps=q.vision_ln_eps)
    full_mask = np.concatenate([np.ones((3, q.num_query), bool), mask], 1)   # queries + text
    out = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(full_mask).long(),
              query_embeds=torch.from_numpy(sd["model.vlm_att_query"]).expand(3, -1, -1),
              encoder_hidden_states=img).last_hidden_state[:, :q.num_query].numpy()
  assert ours.shape == out.shape == (3, q.num_query, q.hidden)
  report("qformer", float(np.abs(ours - out).max()))


def llm_forward(m, ids):
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  h, _ = m(m.embed(ids), pos, pos, jnp.ones(ids.shape, bool))
  return m.logits(h)


def llama_params(cfg, ref):
  sd = torch_ref.state(ref)
  model = Llama(cfg.llm, remat_policy="none")
  shapes = shapes_of(model, jnp.zeros((1, 4), jnp.int32), root="llm", method=llm_forward)
  return model, load(mapping.llm_rules(cfg), sd, shapes, "llm")


LLM_VARIANTS = {"mha": dict(num_kv_heads=4), "gqa": dict(num_kv_heads=2),
                "gqa_rope_linear4": dict(num_kv_heads=1, rope_scaling=4.0)}


@pytest.mark.parametrize("variant", sorted(LLM_VARIANTS))
@pytest.mark.slow
def test_llama_forward_and_cached_decoding(tiny_cfg, variant):
  cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, **LLM_VARIANTS[variant]))
  ref = torch_ref.hf_llama(cfg)
  model, params = llama_params(cfg, ref)
  rng = np.random.RandomState(0)
  b, s = 2, 12
  ids = rng.randint(0, cfg.llm.vocab_size, (b, s)).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.from_numpy(ids).long()).logits.numpy()

  got = model.apply({"params": params}, ids, method=llm_forward)
  report(f"llama[{variant}] forward", float(np.abs(got - want).max()))

  # Step-by-step decoding through LlamaVid's cache path, text-only, ragged prompts:
  # sample 0 has a 5-token prompt, sample 1 a 3-token prompt (right padded).
  lv = LlamaVid(cfg)
  lv_params = {"llm": params}
  lens = np.array([5, 3])
  text_mask = np.arange(s)[None, :5] < lens[:, None]
  empty = dict(frame_mask=np.zeros((b, 0), bool), qformer_ids=np.zeros((b, 1), np.int32),
               qformer_mask=np.ones((b, 1), bool), features=np.zeros((b, 0, 5, cfg.mm_hidden), np.float32))
  logits, cache = lv.apply({"params": lv_params}, ids[:, :5], text_mask, **empty, max_len=s,
                           method=LlamaVid.prefill_cache)
  diffs = [np.abs(np.asarray(logits) - want[np.arange(b), lens - 1]).max()]
  step = jax.jit(lambda p, t, c: lv.apply({"params": p}, t, c, method=LlamaVid.extend_cache))
  for k in range(4):   # feed the reference's own next tokens: ids[b, len_b + k]
    logits, cache = step(lv_params, jnp.asarray(ids[np.arange(b), lens + k]), cache)
    diffs.append(np.abs(np.asarray(logits) - want[np.arange(b), lens + k]).max())
  report(f"llama[{variant}] cached decode", float(max(diffs)))


@pytest.mark.parametrize("compress,projector", [("mean", "mlp2x_gelu"), ("grid:2", "linear"),
                                                ("grid:3", "mlp2x_gelu"), ("none", "linear")])
def test_token_generation_matches_numpy(compress, projector):
  """Eq. 1 and the content pooling against numpy, per (sample, instruction, frame)."""
  rng = np.random.RandomState(0)
  b, p, t, m, n_side, c, dq, d = 2, 2, 3, 4, 7, 12, 8, 16
  queries = rng.randn(b, p, t, m, dq).astype(np.float32)
  x = rng.randn(b, t, n_side * n_side, c).astype(np.float32)
  gen = TokenGenerator(d, compress, projector)
  params = nn.unbox(gen.init(jax.random.key(1), queries, x)["params"])
  params = jax.tree.map(lambda a: np.asarray(a) + rng.randn(*a.shape).astype(np.float32) * 0.3, params)
  tokens, weights = gen.apply({"params": params}, queries, x)

  lin = lambda p, a: a @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
  gelu = lambda a: 0.5 * a * (1 + np.vectorize(__import__("math").erf)(a / np.sqrt(2)))
  mp = params["mm_projector"]
  diff = 0.0
  for bi in range(b):
    for ti in range(t):
      xq = x[bi, ti].astype(np.float64)                                   # [N, C]
      if compress == "mean":
        pooled = xq.mean(0, keepdims=True)
      elif compress == "none":
        pooled = xq
      else:   # torch avg_pool2d, kernel = stride = 7 // g, floor mode
        g = int(compress.split(":")[1]); k = n_side // g; o = (n_side - k) // k + 1
        grid = xq.reshape(n_side, n_side, c)
        pooled = np.stack([grid[i * k:(i + 1) * k, j * k:(j + 1) * k].mean((0, 1))
                           for i in range(o) for j in range(o)])
      content = lin(mp["fc1"], pooled) if projector == "linear" else lin(mp["fc2"], gelu(lin(mp["fc1"], pooled)))
      for pi in range(p):
        qq = lin(params["vlm_att_projector"], queries[bi, pi, ti].astype(np.float64))   # [M, C]
        kk = lin(params["vlm_att_key_projector"], xq)                                    # [N, C]
        scores = qq @ kk.T / np.sqrt(c)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        ctx = lin(params["vlm_att_val_projector"], (w @ xq).mean(0))[None]              # Eq. 1
        want = np.concatenate([ctx, content])
        assert tokens.shape[3] == want.shape[0]
        diff = max(diff, np.abs(tokens[bi, pi, ti] - want).max(), np.abs(weights[bi, pi, ti] - w).max())
  report(f"token_gen[{compress},{projector}]", float(diff))
