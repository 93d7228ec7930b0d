"""train.plan: slice names, the sequence-length rule, the mesh choice, and a whole plan
on the 8 CPU devices (no libtpu); TPU plans only where libtpu is installed."""

import importlib.util
import json

import jax
import pytest

from configs import demo, stage3_long_video_7b
from llamavid_jax.models.config import from_dict
from train import plan

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("name,want", [
    ("v5p-8", ("v5p:2x2x1", {})), ("v5p-16", ("v5p:2x2x2", {})), ("v5p-128", ("v5p:4x4x4", {})),
    ("v5p-256", ("v5p:4x4x8", {})), ("v4-8", ("v4:2x2x1", {})), ("v4-32", ("v4:2x2x4", {})),
    ("v5e-16", ("v5e:4x4", {})), ("v5litepod-8", ("v5e:2x4", {})), ("v6e-256", ("v6e:16x16", {})),
    ("v5e-1", ("v5e:1x1", {"chips_per_host_bounds": (1, 1, 1)})), ("v5p:4x4x12", ("v5p:4x4x12", {}))])
def test_slice_names_count_cores_or_chips_as_cloud_tpu(name, want):
  assert plan.libtpu_name(name) == want


@pytest.mark.parametrize("name,match", [("v5p-6", "power-of-two"), ("v5p-7", "TensorCores"),
                                        ("v9-8", "unknown TPU generation"), ("tpu8", "expected a slice")])
def test_bad_slice_names_say_what_is_expected(name, match):
  with pytest.raises(ValueError, match=match):
    plan.libtpu_name(name)


def test_sequence_length_becomes_frames_and_text_by_one_rule():
  c = stage3_long_video_7b.get_config()
  cfg = from_dict(c.model)
  base = plan.config_shape(c, cfg.input_spec)
  # movie mode: 30720 placeholders + 4096 other text positions (subtitles, prompt)
  assert (base.seq_len, base.text_len, base.frames, base.prompts) == (65536, 34816, 30720, 1)
  for n in (65536, 262144, 1 << 20, 1 << 22):
    s = plan.shape_for(n, base, cfg.tokens_per_frame, cfg.frame_chunk, movie=True)
    assert s.seq_len == n and s.frames % cfg.frame_chunk == 0 and s.text_len - s.frames == 4096
    assert s.text_len + s.frames == n                       # each placeholder gives way to 2 tokens
  assert plan.shape_for(262144, base, 2, 1024, movie=True).frames == 129024
  clip = plan.Shape(65536, 4097, 30720, 1, "")             # one placeholder for all frames
  s = plan.shape_for(262144, clip, 2, 1024)
  assert s.text_len - 1 + 2 * s.frames == 262144 and s.frames == 129024
  with pytest.raises(ValueError, match="shorter than"):
    plan.shape_for(4096, base, 2, 1024, movie=True)
  s = plan.shape_for(1 << 20, base, 2, 1024, movie=True, frames=131072)   # --frames: the text fills the rest
  assert (s.frames, s.text_len, s.text_len + s.frames) == (131072, 917504, 1 << 20)
  s = plan.shape_for(262144, clip, 2, 1024, frames=1024)
  assert (s.frames, s.text_len - 1 + 2 * s.frames) == (1024, 262144)
  with pytest.raises(ValueError, match="frame_chunk"):
    plan.shape_for(1 << 20, base, 2, 1024, movie=True, frames=1000)
  with pytest.raises(ValueError, match="leave no text"):
    plan.shape_for(65536, base, 2, 1024, movie=True, frames=32768)


def test_mesh_is_the_configs_where_it_fits_else_sequence_first():
  c = stage3_long_video_7b.get_config()
  row = plan.Shape(65536, 4097, 30720, 1, "")
  assert plan.choose_mesh(c.mesh, 64, row, 8, True)[0] == dict(data=1, fsdp=8, tensor=1, sequence=8)
  sizes, why = plan.choose_mesh(c.mesh, 4, row, 8, True)     # v5p-8: 4 chips, the recipe wants 8 x sequence
  assert sizes == dict(data=1, fsdp=1, tensor=1, sequence=4) and "does not fit" in why
  big = plan.Shape(1 << 22, 4097, 2095104, 1, "")
  assert plan.choose_mesh(c.mesh, 64, big, 1, True)[0]["sequence"] == 64   # batch 1: no fsdp rows to spare
  text = plan.Shape(4096, 4096, 0, 1, "")                   # no ring attention: fsdp over all devices
  assert plan.choose_mesh(dict(sequence=8), 4, text, 8, False)[0] == dict(data=1, fsdp=4, tensor=1, sequence=1)


@pytest.mark.slow
def test_plan_on_cpu_devices_gives_the_json_keys():
  """The tiny config on the 8 CPU devices: compiled, measured, fits, FLOPs counted."""
  c = demo.get_config("toy,tiny,content_only")
  with c.unlocked():
    c.accum_steps, c.data.use_features = 1, True   # a compile as small as it gets: no ViT, no Q-Former
  topo = plan.topology("cpu:8")
  compiles, report = [], []
  listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None

  class Report:   # the run-plan report is printed before anything compiles
    def write(self, text):
      report.append((text, list(compiles)))

    def flush(self):
      pass

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    p = plan.plan(c, topo, report=Report())
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles and report[0][0].startswith("plan of the run:\n  mesh: data=8 fsdp=1 tensor=1 sequence=1 [the config's]")
  assert all(seen == [] for _, seen in report)
  line = json.loads(plan.json_record(p))
  for key in ("topology", "seq_len", "per_chip_bytes", "hbm_bytes", "fits", "flops_per_step", "compile_seconds",
              "mesh", "batch", "accum_steps"):
    assert key in line, key
  assert line["topology"] == "cpu:8" and line["seq_len"] == 13 and line["fits"] is True   # 12 text + 2 frames - 1
  assert 0 < line["per_chip_bytes"] < line["hbm_bytes"] and line["flops_per_step"] > 0
  assert line["mesh"] == dict(data=8, fsdp=1, tensor=1, sequence=1) and line["step_seconds_at_50_mfu"] is None
  assert "fits: yes" in plan.describe(p, topo, "configs/demo.py:toy,tiny")


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI's venv has none")
def test_plan_compiles_for_v5p_without_a_tpu():
  c = demo.get_config("toy,tiny")
  with c.unlocked():
    c.accum_steps, c.data.use_features = 1, True
  topo = plan.topology("v5p-8")
  assert (len(topo.devices), topo.chips, topo.device_kind) == (4, 4, "TPU v5")
  p = plan.plan(c, topo)
  assert p["fits"] and p["step_seconds_at_50_mfu"] > 0 and p["hbm_bytes"] == 95 << 30


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI's venv has none")
def test_splash_attention_lowers_and_compiles_for_v5p():
  """attention_impl="splash" (Pallas) under the mesh: batch over fsdp, heads over tensor."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from llamavid_jax import sharding
  from llamavid_jax.ops.attention import attention
  mesh = sharding.make_mesh(dict(fsdp=2, tensor=2), list(plan.topology("v5p-8").devices))
  b, s, h, kh, d = 2, 2048, 8, 4, 128
  q = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None, "tensor")))
  k = jax.ShapeDtypeStruct((b, s, kh, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None, "tensor")))
  valid = jax.ShapeDtypeStruct((b, s), jnp.bool_, sharding=NamedSharding(mesh, P("fsdp")))
  slots = lambda: jnp.broadcast_to(jnp.arange(s), (b, s))
  loss = lambda q, k, v, m: jnp.sum(attention(q, k, v, kv_valid=m, q_slots=slots(), impl="splash")
                                    .astype(jnp.float32) ** 2)
  # conftest's "highest" matmul precision is not for bf16 Mosaic kernels ("Bad lhs type")
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), jax.default_matmul_precision("default"):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, valid)
    assert lowered.as_text().count("tpu_custom_call") == 3   # forward, dq, dkv kernels
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI's venv has none")
def test_splash_ring_lowers_and_compiles_for_v5p():
  """attention_impl="splash" with the sequence split (fsdp 2 x sequence 2 on v5p-8): the
  ring of splash steps in the zig-zag layout; 3 step kernels forward, and their dq and
  dkv backward kernels."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from llamavid_jax import sharding
  from llamavid_jax.ops import attention as A
  mesh = sharding.make_mesh(dict(fsdp=2, sequence=2), list(plan.topology("v5p-8").devices))
  b, s, h, kh, d = 2, 4096, 8, 4, 128
  spec = NamedSharding(mesh, P("fsdp", "sequence"))
  q = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16, sharding=spec)
  k = jax.ShapeDtypeStruct((b, s, kh, d), jnp.bfloat16, sharding=spec)
  valid = jax.ShapeDtypeStruct((b, s), jnp.bool_, sharding=spec)
  order = lambda: jnp.broadcast_to(A.zigzag(jnp.arange(s), 2, axis=0), (b, s))
  loss = lambda q, k, v, m: jnp.sum(A.attention(q, k, v, kv_valid=m, q_slots=order(), kv_slots=order(),
                                                impl="splash").astype(jnp.float32) ** 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), jax.default_matmul_precision("default"):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, valid)
    assert lowered.as_text().count("tpu_custom_call") == 9
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0


def _auto(c, **model):
  """`c` with mesh="auto" (a string where the recipe has axis sizes)."""
  with c.unlocked():
    del c["mesh"]
    c.mesh = "auto"
    c.model.update(model)
  return c


@pytest.mark.parametrize("model,batch,seq,want", [
    (dict(), 16, 0, dict(data=1, fsdp=8, tensor=1, sequence=1)),                         # no ring: fsdp over all
    (dict(attention_impl="ring"), 2, 65536, dict(data=1, fsdp=1, tensor=1, sequence=8)),   # 8 x 8192 positions
    (dict(attention_impl="ring"), 2, 32768, dict(data=1, fsdp=2, tensor=1, sequence=4)),   # 4 x 8192; fsdp the rest
])
def test_auto_mesh_in_train_is_the_planners(model, batch, seq, want):
  """mesh="auto": train.train's mesh (build, nothing compiled) is the one train.plan
  plans for the same config on the same 8 devices, by the same rule."""
  from train.train import build
  c = _auto(demo.get_config("toy,tiny"), **model)
  with c.unlocked():
    c.batch_size, c.accum_steps = batch, 1
    if seq:   # ring shards of >= 8192 positions (choose_mesh's min_local); nothing is compiled
      c.data.buckets, c.data.max_len, c.model.llm.max_positions = ((seq - 3, 2, 1),), seq, seq
  planned = plan.setup(c, 8)
  b = build(c)
  assert dict(b.mesh.shape) == planned.sizes == want
  assert b.mesh_rule == planned.mesh_rule and b.mesh_rule.startswith('mesh="auto"')
  assert planned.batch == batch   # the config's (the micro-batches are the planner's own rule)


def test_hardware_facts_are_one_table_read_by_planner_and_metrics():
  from llamavid_jax import hardware
  from train import metrics
  v5p = hardware.for_device_kind("TPU v5")
  assert v5p.name == "v5p" and v5p.hbm_bytes == 95 << 30 and v5p.peak_bf16_flops == 459e12
  assert hardware.for_device_kind("TPU v5 lite").name == "v5e" and hardware.tpu_generation("v5litepod").name == "v5e"
  assert hardware.for_device_kind("NVIDIA H100 80GB HBM3").hbm_bandwidth == 3.35e12
  assert hardware.for_device_kind("NVIDIA A100-SXM4-40GB").name == "a100-40gb"
  assert hardware.for_device_kind("NVIDIA A100 80GB PCIe").name == "a100-80gb"
  assert hardware.for_device_kind("cpu") is None and metrics.peak_flops_per_device() is None   # the CPU suite
  assert metrics.peak_flops_per_device(100) == 100e12
  assert not hasattr(plan, "GENERATIONS") and not hasattr(metrics, "PEAK_TFLOPS")


def test_run_plan_report_names_mesh_attention_placements_offloads_remat():
  """The stage-3 recipe on the 8 test devices (nothing built or compiled): its mesh, the
  LLM's ring, the frame tokens' ring, host features fetched by chunk, host optimizer
  state, remat; the report's attention / placement lines are the step's own decisions."""
  from llamavid_jax import sharding
  from train.planning.policy import run_mesh
  from train.planning.report import run_plan_report
  c = stage3_long_video_7b.get_config()
  sizes, why = run_mesh(c, 8)
  assert run_plan_report(c, sharding.make_mesh(sizes), why) == [
      "plan of the run:",
      "  mesh: data=1 fsdp=1 tensor=1 sequence=8 [the config's]",
      "  attention llm: auto -> ring (a ring over 8 devices; S=65536, T=65536, bfloat16)",
      "  attention qformer: xla (one device a sequence; S=288, T=288, bfloat16)",
      "  context layout: zig-zag over 8 ring devices (4096 positions a chunk)",
      "  frame tokens: ring placement over 8 devices (7680 tokens, 8192 positions a block)",
      "  frames: 30 chunks of 1024, 128 from each of 8 devices",
      "  host inputs ['features']: fetched a frame chunk (1024) at a time",
      "  offloads: optimizer state in host memory; inputs ['features'] in host memory",
      "  remat: nothing_saveable (frame_chunk=1024, mlp_chunk=16384)",
      "  init_from: workdir/stage2_instruct_7b/checkpoints (every parameter must be there)"]
  # a ring named for the short towers is not run as one: the report says what runs instead
  c.model.vision_attention_impl = "ring"
  assert run_plan_report(c, sharding.make_mesh(sizes), why)[3] == (
      "  attention qformer: ring -> chunked (one device a sequence; S=288, T=288, bfloat16)")


def test_run_plan_report_names_parameters_fit_spec_would_replicate():
  from train.planning.report import run_plan_report
  lines = run_plan_report(demo.get_config("toy,tiny"), dict(data=1, fsdp=2, tensor=4, sequence=1))
  assert [l for l in lines if "FALLBACK" in l] == [
      "  parameters: FALLBACK: llm kv_heads 2 does not split over tensor=4: replicated over it"]
  assert not [l for l in run_plan_report(demo.get_config("toy,tiny"), dict(data=1, fsdp=8, tensor=1, sequence=1))
              if "FALLBACK" in l]
