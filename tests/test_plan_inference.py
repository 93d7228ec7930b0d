"""train.plan --inference: the prefill and decode plan on CPU devices (tiny config), the
KV cache and quantized weights counted exactly from shapes, a GPU estimate, and a v5e-1
plan where libtpu is installed."""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from llamavid_jax.models.config import from_dict
from train import plan
from train.planning import inference as I

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
NEW = 8


@pytest.fixture(scope="module")
def tiny():
  c = demo.get_config("toy,tiny,content_only")
  cfg = from_dict(c.model)
  return c, cfg, I.prompt_row(cfg, 32, c)


def kv_elements(cfg, slots: int) -> int:
  """k and v of every layer: 2 x L x 1 row x slots x K x Dh."""
  llm = cfg.llm
  return 2 * llm.num_layers * slots * llm.num_kv_heads * llm.head_dim


def test_inference_plan_on_cpu_devices_counts_the_int8_cache_exactly(tiny):
  """cpu:2, tensor=2 (the policy: the tiny LLM's 2 kv heads split over 2 devices): the
  cache's int8 k, v and float32 scales per device, to the byte; the printed plan."""
  c, cfg, row = tiny
  p = I.plan_inference(cfg, I.target("cpu:2"), row, new_tokens=NEW, kv_cache="int8", features=True)
  line = json.loads(plan.json_record(p))
  for key in ("weight_bytes", "kv_cache_bytes", "input_bytes", "prefill_temp_bytes", "decode_temp_bytes",
              "prefill_bytes", "decode_bytes", "per_device_bytes", "hbm_bytes", "fits", "decode_seconds_at_roofline",
              "mesh", "cache_slots", "estimate"):
    assert key in line, key
  assert (row.seq_len, line["cache_slots"], line["mesh"]["tensor"]) == (32, 32 + NEW, 2)
  elements = kv_elements(cfg, 32 + NEW)                          # 2 x 2 x 40 x 2 x 8 = 2560
  assert elements == 2560
  # int8 elements + one float32 scale per (layer, slot, kv head) for k and v, halved over tensor=2
  assert line["kv_cache_bytes"] == (elements + elements // cfg.llm.head_dim * 4) // 2 == 1920
  assert line["fits"] is True and line["estimate"] is False and line["decode_seconds_at_roofline"] is None
  assert line["decode_bytes"] == (line["weight_bytes"] + line["caches_live_in_decode"] * 1920
                                  + line["decode_temp_bytes"])
  assert line["per_device_bytes"] == max(line["prefill_bytes"], line["decode_bytes"])
  text = I.describe(p, "configs/demo.py:toy,tiny,content_only")
  assert "KV cache 1.9 KiB (int8)" in text and "fits: yes" in text and "ESTIMATE" not in text


def _expected_int8_weights(cfg, params) -> int:
  """bf16 bytes of every parameter, the LLM's kernels as int8 + one bf16 scale per output
  feature (n / contracted size), its embedding table as int8 + one bf16 scale a row."""
  llm = cfg.llm
  contracted = dict(q_proj=llm.d_model, k_proj=llm.d_model, v_proj=llm.d_model, o_proj=llm.num_heads * llm.head_dim,
                    gate_proj=llm.d_model, up_proj=llm.d_model, down_proj=llm.mlp_dim, lm_head=llm.d_model)
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, "key", None) for k in path]
    n = math.prod(x.shape)
    if keys[0] == "llm" and keys[-1] == "kernel" and keys[-2] in contracted:
      total += n + n // contracted[keys[-2]] * 2
    elif keys[:3] == ["llm", "embed_tokens", "embedding"]:
      total += n + x.shape[0] * 2
    else:
      total += n * 2
  return total


@pytest.mark.slow   # ~20 s on 2 cores: a real int4 quantization and a one-layer compile
def test_gpu_estimate_counts_quantized_weights_and_cache_from_shapes(tiny):
  """--gpu 24GB on the tiny model: weights int8 to the byte by the closed form; int4 as
  the real quantized arrays of `quant.quantize` take; the bf16 cache of the full depth;
  temporaries of a one-layer compile; the decode roofline at the L4's 300 GB/s."""
  from llamavid_jax import quant as Q, sharding
  from llamavid_jax.checkpoint import orbax_io
  from llamavid_jax.models import LlamaVid
  c, cfg, row = tiny
  tgt = I.target("cpu:1", gpu="24GB")
  assert tgt.estimate and tgt.hbm_bytes == 24 << 30 and tgt.bandwidth == 300e9
  full = I.model_config(cfg, row.seq_len, NEW)
  params = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(0).normal(size=a), jnp.bfloat16),
                        orbax_io.shape_tree(full), is_leaf=lambda x: isinstance(x, tuple))
  _, q8 = I.abstract_params(full, sharding.make_mesh({}, tgt.devices), "int8")   # the plan's weight bytes
  assert I.tree_device_bytes(q8) == _expected_int8_weights(cfg, params)
  _, q4 = Q.quantize(LlamaVid(full), params, "int4")
  p4 = I.plan_inference(cfg, tgt, row, new_tokens=NEW, quant="int4", features=True)
  assert p4["weight_bytes"] == Q.param_bytes(q4) < I.tree_device_bytes(q8)
  assert p4["kv_cache_bytes"] == kv_elements(cfg, 32 + NEW) * 2 == 5120              # bf16, the full depth
  assert p4["layers_compiled"] == 1 and "ESTIMATE" in p4["temps_rule"]
  assert p4["decode_seconds_at_roofline"] == p4["decode_read_bytes"] / 300e9 > 0
  text = I.describe(p4, "tiny")
  assert "[ESTIMATE]" in text and "(int4)" in text


def test_bad_inference_flags_are_refused_before_compiling(tiny):
  c, cfg, row = tiny
  with pytest.raises(ValueError, match="--kv-cache 'fp8'"):
    I.plan_inference(cfg, I.target("cpu:1"), row, kv_cache="fp8")
  with pytest.raises(ValueError, match="quant 'int3'"):
    I.plan_inference(cfg, I.target("cpu:1"), row, quant="int3")
  with pytest.raises(ValueError, match="--gpu '12GB'"):
    I.target("cpu:1", gpu="12GB")


@pytest.mark.slow   # ~15 s of CPU: four compiles (prefill and decode, one device and eight)
def test_tensor_8_splits_the_compiled_int8_weights_and_cache(tiny_cfg):
  """bench/inference_mesh_memory.py on a width-256 LLM: XLA's argument bytes of the
  compiled prefill (less its inputs) are the int8 weights as placed; on tensor 8 they are
  at most 1/6 of one device's, and the cache exactly 1/8."""
  import dataclasses
  from bench import inference_mesh_memory as B
  llm = dataclasses.replace(tiny_cfg.llm, d_model=256, num_heads=8, num_kv_heads=8, mlp_dim=1024, vocab_size=4096)
  _, plans = B.table(dataclasses.replace(tiny_cfg, llm=llm), modes=("int8",), seq_len=320, new_tokens=8)
  one, eight = plans[("int8", "1")], plans[("int8", "tensor 8")]
  assert one["mesh"]["tensor"] == 1 and eight["mesh"]["tensor"] == 8
  assert 0 < eight["weight_compiled_bytes"] <= one["weight_compiled_bytes"] / 6, (eight, one)
  assert eight["kv_cache_bytes"] * 8 == one["kv_cache_bytes"] == kv_elements(
      dataclasses.replace(tiny_cfg, llm=llm), one["cache_slots"]) * 2


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); CI's venv has none")
def test_inference_plan_compiles_for_v5e_1_without_a_tpu(tiny):
  c, cfg, row = tiny
  tgt = I.target("v5e-1")
  p = I.plan_inference(cfg, tgt, row, new_tokens=NEW, features=True)
  assert p["hbm_bytes"] == 16 << 30 and p["fits"] and not p["estimate"] and p["layers_compiled"] == 2
  assert p["kv_cache_bytes"] == kv_elements(cfg, 32 + NEW) * 2
  assert p["decode_seconds_at_roofline"] == p["decode_read_bytes"] / 819e9


# --- out of device memory at inference: one line naming the plan command ---------------------
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25769803776 bytes."


def _oom(*args, **kw):
  raise jax.errors.JaxRuntimeError(OOM)


def test_out_of_memory_in_load_generate_and_engine_names_the_plan(tiny_ckpt, monkeypatch):
  """A fake XLA out-of-memory error (nothing is allocated) in inference.load, Model.generate,
  Model.stream and the engine's decode step becomes one line naming
  `python -m train.plan --inference` with the checkpoint, prompt and quant filled in."""
  from llamavid_jax import engine, inference, validation
  from llamavid_jax.checkpoint import orbax_io
  ckpt = tiny_ckpt + "/inference"
  m = inference.load(ckpt)
  req = m.request("What is the man doing?", None)
  with monkeypatch.context() as mp:
    mp.setattr(inference.gen, "generate", _oom)
    with pytest.raises(validation.DeviceMemoryError) as e:
      m.generate([req], max_new_tokens=5)
  seq = inference.gen.prompt_length(m.model, m._batch([req], None, None))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("generate: out of device memory (RESOURCE_EXHAUSTED")
  assert msg.endswith(f"python -m train.plan --inference --ckpt {ckpt} --topology <slice, or --gpu 24GB|80GB> "
                      f"--seq-len {seq} --new-tokens 5 --dtype float32")
  with monkeypatch.context() as mp:
    mp.setattr(inference.gen, "stream", lambda *a, **k: (_oom() for _ in range(1)))
    with pytest.raises(validation.DeviceMemoryError, match=f"--seq-len {seq} --new-tokens 7 --dtype float32$"):
      list(m.stream(req, max_new_tokens=7))
  with monkeypatch.context() as mp:
    mp.setattr(orbax_io, "load_for_inference", _oom)
    with pytest.raises(validation.DeviceMemoryError, match=r"^loading the checkpoint: .* --seq-len <prompt positions> "
                                                           r"--quant int8$"):
      inference.load(ckpt, quant="int8", dtype="bfloat16")
  eng = engine.Engine(m, slots=2, max_positions=64, start=False)
  eng._decode_jit = _oom
  with pytest.raises(validation.DeviceMemoryError, match="^the engine's decode step: .* --seq-len 64 --new-tokens 0 "
                                                         "--batch 2 --dtype float32$"):
    eng._run_decode()
  with pytest.raises(RuntimeError, match="INTERNAL"):   # other XLA errors pass through unchanged
    with validation.device_memory("generate"):
      raise jax.errors.JaxRuntimeError("INTERNAL: something else")
