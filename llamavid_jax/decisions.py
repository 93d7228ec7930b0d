"""The decisions of a run on a mesh, made once before anything compiles: the LLM's
context layout for a config (`llm_layout`: zig-zag where its attention runs as a ring)
and every decision as one line each (`describe`: attention per tower, layout, frame-token
placement, frame fetch, parameters that keep fewer mesh axes than their names ask), for
the run's plan report. It sits above the model, the attention kernels and `parallel/`,
which know nothing of each other's choices.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from llamavid_jax import sharding
from llamavid_jax.models.splice import batch_spliced_length
from llamavid_jax.ops import attention
from llamavid_jax.parallel import ContextLayout, context_layout, fetch_decision, placement_decision


def llm_layout(cfg, length: int) -> ContextLayout:
  """The context layout of an LLM sequence of `length` positions under the current mesh
  and logical rules, for `cfg.attention_impl` (zig-zag where it runs as a ring)."""
  return context_layout(attention.ring_shards(cfg.attention_impl, "llm"), length)


def describe(cfg, mesh, batch: dict, params=None, rules=sharding.LOGICAL_RULES) -> list[str]:
  """The decisions a train step (or a prefill) on `mesh` makes for a global batch, one
  line each: attention per tower (LLM, ViT, Q-Former), the context layout, how frame
  tokens reach their positions, how frames are fetched. cfg: LlamaVidConfig; batch: the
  model inputs (arrays or jax.ShapeDtypeStruct; shapes are all that is read): input_ids
  [B, S], frame_mask [B, T], qformer_ids [B, L] or [B, P, L], frames or features. A line
  with "ALL-GATHER" or "across devices" is a fallback that costs memory or time. params:
  the boxed abstract parameters (`jax.eval_shape(model.init, ...)`), to add a line on the
  leaves that keep fewer mesh axes than their names ask for (`sharding.replicated_leaves`)."""
  b, t = batch["frame_mask"].shape
  q = batch["qformer_ids"]
  p = q.shape[1] if q.ndim == 3 else 1
  s_out = batch_spliced_length(batch, cfg.tokens_per_frame, movie=cfg.movie)
  k = t * cfg.tokens_per_frame * (1 if cfg.movie else p)
  llm, vis, qf = cfg.llm, cfg.vision, cfg.qformer
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    layout = llm_layout(cfg, s_out)
    lines = [attention.decide(cfg.attention_impl, "llm", (b, s_out, llm.num_heads, llm.head_dim),
                              (b, s_out, llm.num_kv_heads, llm.head_dim), True, layout.ring, cfg.dtype)[1]]
    frames = b * t * (p if cfg.use_context_token else 1)
    if "frames" in batch:
      n = vis.num_tokens
      lines.append(attention.decide(cfg.vision_attention_impl, "vit", (b * t, n, vis.num_heads, vis.width // vis.num_heads),
                                    (b * t, n, vis.num_heads, vis.width // vis.num_heads), False, False, cfg.dtype)[1])
    if cfg.use_context_token:
      m = qf.num_query + q.shape[-1]
      hd = qf.hidden // qf.num_heads
      lines.append(attention.decide(cfg.vision_attention_impl, "qformer", (frames, m, qf.num_heads, hd),
                                    (frames, m, qf.num_heads, hd), False, False, cfg.dtype)[1])
    lines.append(f"context layout: {layout.why}")
    lines.append(placement_decision(mesh, b, k, s_out, llm.d_model).why)
    if "features" in batch or "frames" in batch:
      x = batch["features"] if "features" in batch else batch["frames"]
      lines.append(fetch_decision(mesh, x.shape, cfg.frame_chunk).why)
  if params is not None:
    leaves = sharding.replicated_leaves(params, mesh, rules)
    lines.append(f"parameters: {len(leaves)} leaves keep fewer mesh axes than their names ask"
                 + (f" ({'; '.join(leaves[:3])}{'; ...' if len(leaves) > 3 else ''})" if leaves else ""))
  return lines
