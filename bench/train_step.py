"""Train-step throughput of a config on random in-memory batches (no data pipeline), against
this machine's measured fp32 matmul rate and against the same LLM in PyTorch.

  python bench/train_step.py --config configs/demo.py:toy [--config.batch_size=64] [--steps 20]
      [--attention xla,chunked] [--notorch] [--matmul_n 2048] [--json]

Prints, in one run:
  1. the config's train step (`train.train.build(config)` on `train.toy_data.ToyBatches`):
     compile time, step time (mean of --steps), tokens/s and model FLOP/s from
     train/metrics.py's count; MFU where the device's peak is known (or
     --config.log.peak_tflops is given);
  2. the measured fp32 matmul rate: jit(jnp.dot) of two float32 [N, N] matrices, median of
     --matmul_reps after a warm-up, 2 N^3 / t FLOP/s (one device, default precision); the
     train step's FLOP/s as a percentage of it times the device count ("of measured
     matmul": an MFU against what this machine's matmuls actually reach, meaningful on
     CPUs, whose peak no table holds);
  3. with --torch (the default; --notorch skips it): the LLM alone, the same model in both
     frameworks. A text-only LLaMA of the config's LLM size (config.model.llm), at the
     config's batch size and its LLM sequence length (the spliced length S' the train step
     runs), full-length sequences (no padding), fp32, next-token cross entropy over every
     position, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.01), no clipping:
       ours   llamavid_jax.models.llama.Llama (remat "none": PyTorch keeps its activations
              too) with optax.adamw in one jitted step, per --attention implementation.
              Not the project's train step: that one is LlamaVid's (a Q-Former, token
              generation and a ViT around the LLM, and ToyBatches always carry frames),
              with no PyTorch twin to time;
       torch  transformers.LlamaForCausalLM (random init, attn_implementation="sdpa") with
              torch.optim.AdamW (its default implementation), torch.set_num_threads(
              os.cpu_count()) (XLA's CPU backend uses every core too; --torch_threads
              sets another count). On cores another process keeps busy, torch's OpenMP
              threads wait for each other at every op: measured on 2 cores with one held
              by another process, the toy LLM's step took ~1.5 s at 2 threads and ~45 ms
              at 1, while ours stayed at ~110 ms in the same window. Such a run's ratio
              says more about the load than about either framework: on a shared machine
              --torch_threads 1 gives torch's uncontended speed (then ours, on every
              core, is the one with more threads when the cores are free).
     The config maps onto LlamaConfig as tests/torch_ref.py's hf_llama does; both parameter
     counts are printed, and the run stops if they differ. --warmup steps of each, then
     --compare_steps timed steps of each, alternating ours and torch (both meet the same
     background load), each waited for; medians. ratio = ours / torch step time
     (> 1: ours is slower). torch is imported only here; absent, this part is skipped
     with a message. Sizes: --config.model.llm.d_model=... etc., --config.data.text_len.

--json prints one JSON object per line instead of the text: first the config's train step
(kind "train_step", torch fields null), then one per attention implementation (kind
"llm_vs_torch"); every line has attention, ours_step_s, torch_step_s, ratio, matmul_flops,
achieved_flops and pct_of_matmul (those of "ours").
"""

import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py:toy", "config file[:arg]")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps of the config's train step (after one compile step)")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 2048, "side N of the float32 [N, N] matmul timed for the rate")
_MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 5, "timed matmuls (median)")
_TORCH = flags.DEFINE_bool("torch", True, "compare the LLM alone with PyTorch's LlamaForCausalLM + AdamW")
_ATTENTION = flags.DEFINE_list("attention", ["xla", "chunked"], "our attention implementations to compare")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps per side before the comparison's timed ones")
_COMPARE_STEPS = flags.DEFINE_integer("compare_steps", 15, "timed steps per side in the comparison (median)")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 = os.cpu_count()")
_JSON = flags.DEFINE_bool("json", False, "one JSON object per line instead of the text")

# AdamW of both sides of the comparison (speed does not depend on them; equal for honesty).
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def say(text: str) -> None:
  if not _JSON.value:
    print(text, flush=True)


def emit(**record) -> None:
  if _JSON.value:
    print(json.dumps(record), flush=True)


def matmul_rate(n: int, reps: int) -> float:
  """FLOP/s of jit(jnp.dot) on float32 [n, n] x [n, n]: 2 n^3 / median time."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()   # compile + first touch of the buffers
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times)


def config_step(c, steps: int) -> dict:
  """The config's own train step on ToyBatches -> its figures (step time: mean of `steps`)."""
  from llamavid_jax.models import spliced_length
  from train import metrics, optim
  from train.toy_data import ToyBatches
  from train.train import build
  d = c.data
  b = build(c)
  state = b.init(c.seed)
  data = ToyBatches(b.model_cfg, c.batch_size, d.text_len, d.num_frames, d.qformer_len, d.use_features,
                    seed=c.seed, process_index=jax.process_index(), process_count=jax.process_count())
  t = time.perf_counter()
  state, m = b.trainer(state, next(data))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  tokens = 0
  t = time.perf_counter()
  for _ in range(steps):
    state, m = b.trainer(state, next(data))
    tokens += int(m["tokens"])
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t) / steps
  trains = {k: any(l == optim.TRAINABLE for l in jax.tree.leaves(v)) for k, v in b.labels.items()}
  flops = metrics.flops_per_step(b.model_cfg, c.batch_size, d.text_len, d.num_frames, d.qformer_len,
                                 d.use_features, trains)
  return dict(model_cfg=b.model_cfg, mesh=dict(b.mesh.shape), compile_s=compile_s, step_s=dt,
              tokens_per_s=tokens / steps / dt, flops=flops,
              s_llm=spliced_length(d.text_len, d.num_frames, b.model_cfg.tokens_per_frame),
              peak=metrics.peak_flops_per_device(c.log.get("peak_tflops")))


def report_config_step(c, r: dict, matmul: float) -> None:
  """matmul: one device's measured FLOP/s; the step runs on all of them."""
  achieved = r["flops"] / r["step_s"]
  peak, pct = r["peak"], achieved / (matmul * jax.device_count())
  say(f"devices {jax.device_count()} ({jax.devices()[0].device_kind}) mesh {r['mesh']}")
  say(f"batch {c.batch_size} x {r['s_llm']} LLM positions, accum {c.accum_steps}, attention "
      f"{c.model.get('attention_impl', 'xla')}; compile+first step {r['compile_s']:.1f}s")
  say(f"step_time {r['step_s'] * 1e3:.1f} ms  target tokens/s {r['tokens_per_s']:.0f}  "
      f"LLM positions/s {c.batch_size * r['s_llm'] / r['step_s']:.0f}  model TFLOP/step {r['flops'] / 1e12:.4f}  "
      f"achieved TFLOP/s {achieved / 1e12:.3f}" + (f"  MFU {achieved / (peak * jax.device_count()):.1%}"
                                                   if peak else "  MFU n/a (unknown peak: --config.log.peak_tflops)"))
  n = _MATMUL_N.value
  say(f"measured fp32 matmul ([{n}, {n}] x [{n}, {n}], one device) {matmul / 1e12:.3f} TFLOP/s; "
      f"train step {pct:.1%} of measured matmul (MFU vs measured matmul)")
  emit(kind="train_step", attention=c.model.get("attention_impl", "xla"), ours_step_s=r["step_s"],
       torch_step_s=None, ratio=None, matmul_flops=matmul, achieved_flops=achieved,
       pct_of_matmul=100 * pct, compile_s=r["compile_s"], flops_per_step=r["flops"],
       batch=c.batch_size, seq=r["s_llm"])


def median_step_s(steps: dict, warmup: int, n: int) -> dict:
  """steps: name -> step() that runs one step and waits for it -> name -> median seconds.
  The steps alternate (a, b, a, b, ...) so that each side meets the same share of
  whatever else loads the machine, which comes and goes within a run."""
  for _ in range(warmup):
    for step in steps.values():
      step()
  times = {k: [] for k in steps}
  for _ in range(n):
    for k, step in steps.items():
      t = time.perf_counter()
      step()
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def ours_llm(l, impl: str, ids: np.ndarray):
  """Llama + optax.adamw, one jitted step on ids int32[B, S] -> (step(), parameter count)."""
  import optax
  from flax import linen as nn
  from llamavid_jax.models.llama import Llama
  model = Llama(l, attention_impl=impl, remat_policy="none")
  b, s = ids.shape
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))   # positions = causal slots, no padding
  valid = jnp.ones((b, s), bool)

  def logits(m, ids):   # [B, S] -> float32[B, S, V]
    return m.logits(m(m.embed(ids), pos, pos, valid)[0])

  def loss(params, ids):   # mean next-token cross entropy, as LlamaForCausalLM(labels=ids)
    out = model.apply({"params": params}, ids, method=logits)
    return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], ids[:, 1:]).mean()

  x = jnp.asarray(ids)
  params = nn.unbox(model.init(jax.random.key(0), x, method=logits)["params"])
  tx = optax.adamw(ADAMW["lr"], ADAMW["b1"], ADAMW["b2"], ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

  @functools.partial(jax.jit, donate_argnums=(0, 1))   # updated in place, as torch's optimizer does
  def train_step(params, opt_state, ids):
    value, g = jax.value_and_grad(loss)(params, ids)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  state = [params, tx.init(params)]

  def step():
    state[0], state[1], value = train_step(state[0], state[1], x)
    value.block_until_ready()

  return step, sum(p.size for p in jax.tree.leaves(params))


def torch_llm(l, ids: np.ndarray, threads: int):
  """LlamaForCausalLM + torch.optim.AdamW on ids int64[B, S] -> (step(), parameter count)."""
  import torch
  import transformers as tr
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  rope = {"rope_type": "linear", "factor": float(l.rope_scaling), "rope_theta": l.rope_theta} \
      if l.rope_scaling != 1.0 else {"rope_type": "default", "rope_theta": l.rope_theta}
  cfg = tr.LlamaConfig(   # tests/torch_ref.py's hf_llama mapping
      vocab_size=l.vocab_size, hidden_size=l.d_model, intermediate_size=l.mlp_dim,
      num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
      rms_norm_eps=l.rms_eps, max_position_embeddings=max(l.max_positions, ids.shape[1]), rope_parameters=rope,
      tie_word_embeddings=l.tie_embeddings, attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
  model = tr.LlamaForCausalLM(cfg).train()
  assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
  opt = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                          weight_decay=ADAMW["weight_decay"])
  x = torch.from_numpy(ids.astype(np.int64))

  def step():   # torch runs eagerly: the step is done when it returns
    opt.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()

  return step, sum(p.numel() for p in model.parameters())


def compare_torch(c, r: dict, matmul: float) -> None:
  """The LLM alone, ours (per --attention) vs PyTorch, at the config's batch and S'."""
  try:
    import torch
    import transformers  # noqa: F401
  except ImportError as e:
    print(f"PyTorch comparison skipped: {e} (pip install torch transformers, or --notorch)", file=sys.stderr)
    return
  from train import metrics
  l = r["model_cfg"].llm
  b, s = c.batch_size, r["s_llm"]
  ids = np.random.default_rng(c.seed).integers(0, l.vocab_size, (b, s), dtype=np.int32)   # [B, S']
  # The LLM-only count of train/metrics.py: no frames (S' = S), features (no ViT), only the LLM trains.
  flops = metrics.flops_per_step(r["model_cfg"], b, s, 0, 0, True, {"llm": True})
  torch_step, torch_params = torch_llm(l, ids, _TORCH_THREADS.value or os.cpu_count())
  say(f"LLM alone (d_model {l.d_model}, {l.num_layers} layers, {l.num_heads}/{l.num_kv_heads} heads, mlp "
      f"{l.mlp_dim}, vocab {l.vocab_size}), batch {b} x {s}, fp32, AdamW; torch {torch_params:,} params, "
      f"{torch.get_num_threads()} threads, sdpa; model TFLOP/step {flops / 1e12:.4f}")
  for impl in _ATTENTION.value:
    ours_step, ours_params = ours_llm(l, impl, ids)
    if ours_params != torch_params:
      raise SystemExit(f"not the same model: ours {ours_params:,} parameters, torch {torch_params:,}")
    t = median_step_s({"ours": ours_step, "torch": torch_step}, _WARMUP.value, _COMPARE_STEPS.value)
    ours_s, torch_s = t["ours"], t["torch"]
    say(f"  attention {impl:8s} ours {ours_params:,} params {ours_s * 1e3:.1f} ms ({flops / ours_s / matmul:.1%} "
        f"of measured matmul)  torch {torch_s * 1e3:.1f} ms ({flops / torch_s / matmul:.1%})  "
        f"ours/torch {ours_s / torch_s:.2f}x")
    emit(kind="llm_vs_torch", attention=impl, ours_step_s=ours_s, torch_step_s=torch_s, ratio=ours_s / torch_s,
         matmul_flops=matmul, achieved_flops=flops / ours_s, pct_of_matmul=100 * flops / ours_s / matmul,
         torch_achieved_flops=flops / torch_s, torch_pct_of_matmul=100 * flops / torch_s / matmul,
         params_ours=ours_params, params_torch=torch_params, flops_per_step=flops, batch=b, seq=s,
         torch_threads=torch.get_num_threads())


def main(_):
  c = _CONFIG.value
  r = config_step(c, _STEPS.value)
  matmul = matmul_rate(_MATMUL_N.value, _MATMUL_REPS.value)
  report_config_step(c, r, matmul)
  if _TORCH.value:
    compare_torch(c, r, matmul)


if __name__ == "__main__":
  app.run(main)
