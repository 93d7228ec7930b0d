"""The plan of a run, printed by `train.train` and `train.plan` before anything
compiles: the mesh (and why), the attention implementation of each tower, where frame
tokens and features are placed, what lives in host memory, the remat policy, and any
fallback that costs memory or speed (lines starting "FALLBACK").

The attention, context-layout, frame-token and frame-fetch lines are the decisions the
step itself makes (`llamavid_jax.decisions.describe`, on the abstract global batch of
the config's longest bucket): the report and the run cannot disagree."""

from __future__ import annotations

HEADER = "plan of the run:"


def _host_inputs(c, model_cfg, shape) -> list[str]:
  """Which inputs live in host memory and how they reach the chips."""
  host = list(c.data.get("host_inputs", None) or ())
  chunk = model_cfg.frame_chunk
  if not host:
    return []
  return [f"host inputs {host}: fetched " + (f"a frame chunk ({chunk}) at a time" if chunk and shape.frames > chunk
                                             else "whole")]


def _parameter_fallbacks(model_cfg, sizes: dict) -> list[str]:
  """Parameter dims that `sharding.fit_spec` would not split as the logical rules say
  (it drops the mesh axes a dim does not divide: the parameter is replicated over them)."""
  import types
  from llamavid_jax import sharding
  mesh = types.SimpleNamespace(shape=sizes)
  l, v, q = model_cfg.llm, model_cfg.vision, model_cfg.qformer
  dims = [("llm d_model", "embed", l.d_model), ("llm heads", "heads", l.num_heads),
          ("llm kv_heads", "kv_heads", l.num_kv_heads), ("llm mlp", "mlp", l.mlp_dim),
          ("llm vocab", "vocab", l.vocab_size), ("vit width", "embed", v.width)]
  if model_cfg.use_context_token:
    dims.append(("qformer hidden", "embed", q.hidden))
  out = []
  for what, axis, n in dims:
    want = sharding.logical_to_spec((axis,))
    got = sharding.fit_spec(want, (n,), mesh)
    lost = [a for a in sharding.spec_axes(want[0]) if a not in sharding.spec_axes(got[0]) and sizes.get(a, 1) > 1]
    if lost:
      out.append(f"parameters: FALLBACK: {what} {n} does not split over {' x '.join(f'{a}={sizes[a]}' for a in lost)}: "
                 "replicated over it")
  return out


def run_plan_report(config, mesh, mesh_rule: str | None = None) -> list[str]:
  """The lines of the run's plan (the first is `HEADER`) for ConfigDict `config` on
  `mesh` (a jax Mesh, or its axis sizes); `mesh_rule` says why this mesh ("the
  config's", or `choose_mesh`'s reason for `mesh="auto"`)."""
  from llamavid_jax import decisions, sharding
  from llamavid_jax.models.config import from_dict
  from train import step as S
  from train.planning.policy import config_shape, is_auto
  model_cfg = from_dict(config.model)
  if not hasattr(mesh, "devices"):   # axis sizes: a mesh of this host's devices
    mesh = sharding.make_mesh(dict(mesh))
  sizes = dict(mesh.shape)
  shape = config_shape(config, model_cfg.input_spec)
  rule = mesh_rule or ('mesh="auto"' if is_auto(config.mesh) else "the config's")
  lines = [HEADER, "mesh: " + " ".join(f"{k}={v}" for k, v in sizes.items()) + f" [{rule}]"]
  d = config.data
  batch = S.abstract_batch(model_cfg, config.batch_size, shape.text_len, shape.frames, d.qformer_len,
                           d.use_features, shape.prompts)
  lines += decisions.describe(model_cfg, mesh, batch)
  lines += _host_inputs(config, model_cfg, shape)
  lines += _parameter_fallbacks(model_cfg, sizes)
  offloads = []
  if config.optim.get("host_state", False):
    offloads.append("optimizer state in host memory")
  if model_cfg.remat_policy == "offload_layer_inputs":
    offloads.append("LLM layer inputs in host memory for the backward pass")
  host = list(config.data.get("host_inputs", None) or ())
  if host:
    offloads.append(f"inputs {host} in host memory")
  lines.append("offloads: " + ("; ".join(offloads) if offloads else "none"))
  chunks = [f"frame_chunk={model_cfg.frame_chunk}"] if model_cfg.frame_chunk else []
  chunks += [f"mlp_chunk={model_cfg.mlp_chunk}"] if model_cfg.mlp_chunk else []
  lines.append(f"remat: {model_cfg.remat_policy}" + (f" ({', '.join(chunks)})" if chunks else ""))
  if config.get("init_from"):
    partial = bool(config.get("init_from_partial", False))
    lines.append(f"init_from: {config.init_from}" + (" (partial: missing leaves keep their fresh init)"
                                                      if partial else " (every parameter must be there)"))
  return [lines[0]] + ["  " + l for l in lines[1:]]
