"""The plan of a run, printed by `train.train` and `train.plan` before anything
compiles: the mesh (and why), the attention implementation of each tower, where frame
tokens and features are placed, what lives in host memory, the remat policy, and any
fallback that costs memory or speed (lines starting "FALLBACK").

The attention and placement lines are computed from the config here, with
`ops.attention`'s own rules (`auto_impl`, `RING_IMPLS`), imported inside
`_attention` / `_placements` only, so they are easy to point at the modules that
make those decisions once they expose them."""

from __future__ import annotations

HEADER = "plan of the run:"


def _sizes(mesh) -> dict[str, int]:
  return dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)


def _platform(mesh) -> str:
  import jax
  devices = getattr(mesh, "devices", None)
  if devices is not None:
    return devices.flat[0].platform
  return jax.default_backend()


def _attention(model_cfg, mesh, seq_len: int, qformer_len: int) -> list[str]:
  """One line per tower: the configured impl, what `auto` resolves to, and whether it
  runs as a ring over `sequence`."""
  import jax
  from llamavid_jax.ops import attention
  sizes, platform = _sizes(mesh), _platform(mesh)
  seq = sizes.get("sequence", 1)
  v = model_cfg.vision
  towers = [("llm", model_cfg.attention_impl, seq_len, True),
            ("vit", model_cfg.vision_attention_impl, v.grid ** 2 + 1, False)]
  if model_cfg.use_context_token:
    q = model_cfg.qformer
    towers.append(("qformer", model_cfg.vision_attention_impl, q.num_query + qformer_len, False))
  out = []
  for name, impl, s, causal in towers:
    resolved = impl
    if impl == "auto":
      with jax.set_mesh(mesh) if hasattr(mesh, "devices") else _null():
        resolved = attention.auto_impl((1, s, 1, 1), (1, s, 1, 1), causal, False, backend=platform,
                                       dtype=model_cfg.dtype)
    ring = seq > 1 and impl in attention.RING_IMPLS
    line = f"attention {name}: {impl}" + (f" -> {resolved}" if resolved != impl else "") + f" ({s} positions"
    line += f", ring over sequence={seq})" if ring else ")"
    if ring and name != "llm":
      line += f"; FALLBACK: the {name}'s short sequence runs as a ring because the mesh splits the LLM's"
    out.append(line)
  return out


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def _placements(c, model_cfg, sizes: dict, shape) -> list[str]:
  """Frame tokens into the LLM sequence, and features from host memory."""
  from llamavid_jax import sharding
  g_len = 1
  for a in sharding.mesh_axes("length"):
    g_len *= sizes.get(a, 1)
  g_frames = 1
  for a in sharding.mesh_axes("frames"):
    g_frames *= sizes.get(a, 1)
  out = []
  if shape.frames:
    prompts = 1 if model_cfg.movie else shape.prompts
    k = prompts * shape.frames * model_cfg.tokens_per_frame
    if g_len == 1:
      out.append("frame tokens: a gather into the LLM positions (the length is not split)")
    elif k % g_len or shape.seq_len % g_len:
      out.append(f"frame tokens: FALLBACK: a gather of all {k} tokens on every device ({k} tokens or "
                 f"{shape.seq_len} positions do not split over {g_len} length shards)")
    else:
      out.append(f"frame tokens: round the ring over {g_len} length shards ({k // g_len} tokens a block)")
  host = tuple(c.data.get("host_inputs", None) or ())
  chunk = model_cfg.frame_chunk
  if "features" in host or "frames" in host:
    if chunk and shape.frames > chunk and g_frames > 1 and chunk % g_frames:
      out.append(f"host inputs {list(host)}: FALLBACK: frame_chunk {chunk} does not split over {g_frames} "
                 "frame shards: each chunk is fetched whole")
    else:
      out.append(f"host inputs {list(host)}: fetched " + (f"a frame chunk ({chunk}) at a time" if chunk else "whole"))
  return out


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
  from llamavid_jax.models.config import from_dict
  from train.planning.policy import config_shape, is_auto
  model_cfg = from_dict(config.model)
  sizes = _sizes(mesh)
  shape = config_shape(config, model_cfg.input_spec)
  rule = mesh_rule or ('mesh="auto"' if is_auto(config.mesh) else "the config's")
  lines = [HEADER, "mesh: " + " ".join(f"{k}={v}" for k, v in sizes.items()) + f" [{rule}]"]
  lines += _attention(model_cfg, mesh, shape.seq_len, config.data.get("qformer_len", 0))
  lines += _placements(config, model_cfg, sizes, shape)
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
