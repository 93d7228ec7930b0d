"""Training logs: a console line + TensorBoard scalars per logging step, a progress
bar, and a loss-curve PNG at the end; model FLOPs for MFU.

FLOPs are counted per matmul, 2 per multiply-add, per tower, separately for the
forward pass (2 x params x tokens), the activation gradients (another 2x, needed
whenever anything *upstream* of the tower trains) and the weight gradients (2x, only
for towers that train): a frozen LLM in stage 1 still costs 4x, the frozen ViT 2x.
Attention scores add 4 x layers x width x tokens^2 per forward (PaLM's 12 L d T per
token for fwd + bwd, counted without a causal discount).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np

from llamavid_jax import hardware
from llamavid_jax.models.splice import spliced_length
from llamavid_jax.models.token_gen import projector


def peak_flops_per_device(override_tflops: float | None = None) -> float | None:
  """Dense bf16 FLOP/s of this process's devices (llamavid_jax/hardware.py), or the
  config's `log.peak_tflops`; None on CPU and unknown chips: MFU is not reported."""
  if override_tflops:
    return override_tflops * 1e12
  return hardware.peak_flops(jax.devices()[0].device_kind)


def _tower(params_per_token, tokens, attn, trains, upstream_trains):
  """forward, + activation grads if it or anything upstream trains, + weight grads if it trains."""
  fwd = 2 * params_per_token * tokens + attn
  return fwd * (1 + int(trains or upstream_trains) + int(trains))


def flops_per_step(cfg, batch: int, text_len: int, num_frames: int, qformer_len: int,
                   use_features: bool, trains: dict[str, bool], num_prompts: int = 1) -> float:
  """Model FLOPs of one optimizer step over `batch` sequences of `text_len` text
  positions, `num_frames` frame slots and `num_prompts` instruction slots (movie mode:
  one instruction; the text's placeholders are the frames). trains: tower name (vit,
  qformer, token_gen, llm) -> whether any of its parameters train."""
  l, v, q = cfg.llm, cfg.vision, cfg.qformer
  frames = batch * num_frames
  num_prompts = 1 if cfg.movie else num_prompts
  # LLM on the S' spliced positions (embedding lookup is free; the LM head is a matmul).
  s = spliced_length(text_len, num_frames, cfg.tokens_per_frame, num_prompts, movie=cfg.movie)
  hd = l.head_dim
  per_tok = l.num_layers * (l.d_model * hd * (2 * l.num_heads + 2 * l.num_kv_heads) + 3 * l.d_model * l.mlp_dim) \
      + l.d_model * l.vocab_size
  attn = 4 * l.num_layers * l.d_model * s * s * batch
  upstream_llm = trains.get("token_gen", False) or trains.get("qformer", False)
  total = _tower(per_tok, batch * s, attn, trains.get("llm", False), upstream_llm)
  # Token generation (projectors; tiny) + Q-Former on M + L tokens per frame and
  # instruction; the content tokens and K(X) are made once per frame.
  n = v.grid ** 2
  nq = cfg.feature_shape[0]                # the Q-Former's keys: N+1 with CLS (clip), N (movie)
  tg = frames * cfg.content_tokens_per_frame * projector(cfg.mm_projector_type).flops_per_token(cfg.mm_hidden, l.d_model)
  if cfg.use_context_token:
    fp = frames * num_prompts
    tg += 2 * fp * (q.num_query * q.hidden * cfg.mm_hidden + cfg.mm_hidden * l.d_model) + 2 * frames * n * cfg.mm_hidden ** 2
    tg += 4 * fp * q.num_query * n * cfg.mm_hidden
    qt = q.num_query + qformer_len
    per_q = q.num_layers * (4 * q.hidden ** 2 + 2 * q.hidden * q.mlp_dim)
    ncross = math.ceil(q.num_layers / q.cross_attention_freq)
    qf = 2 * fp * (per_q * qt + ncross * (2 * q.hidden ** 2 * q.num_query + 2 * q.vision_width * q.hidden * nq))
    qf += 4 * fp * q.num_layers * q.hidden * qt * qt + 4 * fp * ncross * q.hidden * q.num_query * nq
    total += qf * (3 if trains.get("qformer") else 1)   # nothing upstream of it trains
  total += tg * (3 if trains.get("token_gen") else (2 if trains.get("qformer") else 1))
  # ViT: forward only behind the release's stop_gradient (freeze_vision); none with features.
  if not use_features:
    nt = n + 1
    per_v = v.depth * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim) + 3 * v.patch_size ** 2 * v.width
    vit = 2 * per_v * nt * frames + 4 * v.depth * v.width * nt * nt * frames
    total += vit * (1 if cfg.freeze_vision else 1 + 2 * int(trains.get("vit", False)))
  return float(total)


class MetricLogger:
  """Only process 0 writes; every process keeps the in-memory history.

  Resuming at `start_step` drops what a killed run logged after it: metrics.jsonl
  lines with a later step (the file is rewritten atomically) and TensorBoard events
  from step start_step + 1 on (a SessionLog START, as SummaryWriter's purge_step).

  TensorBoard scalars go through tensorboardX's synchronous EventsWriter, one event
  per logging step, flushed: SummaryWriter hands events to a writer thread through a
  queue, and its flush() does not wait for that queue (tensorboardX 2.6.5, measured:
  after 8 add_scalar and flush(), 1 of the 8 was in the file)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, every: int,
               flops_per_step: float | None = None, peak_flops: float | None = None, progress: bool = True):
    self.every, self.flops, self.peak = every, flops_per_step, peak_flops
    self.history: list[tuple[int, float]] = []
    self.main = jax.process_index() == 0
    self.workdir = workdir
    self.tb = self.bar = self.jsonl = None
    if self.main:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _truncate_jsonl(path, start_step)
      self.jsonl = open(path, "a")
      self.tb = _events_writer(os.path.join(workdir, "tb"), start_step + 1 if start_step else None)
      if progress:
        from tqdm import tqdm
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0)
    self._t = time.perf_counter()
    self._sums = dict(positions=0.0, tokens=0.0)
    self._steps = 0

  def step(self, step: int, m: dict):
    """step: 1-based count of finished steps; m: host scalars (loss, lr, grad_norm,
    tokens = target tokens, positions = LLM positions computed)."""
    self.history.append((step, m["loss"]))
    if self.jsonl is not None:   # every step, full precision (resume tests compare bitwise)
      self.jsonl.write(json.dumps(dict(m, step=step)) + "\n")
      self.jsonl.flush()
    for k in self._sums:
      self._sums[k] += m[k]
    self._steps += 1
    if self.bar is not None:
      self.bar.update(1)
    if step % self.every:
      return
    self._log(step, m)

  def _log(self, step: int, m: dict):
    """The console line and TensorBoard scalars (flushed: a killed run keeps its curves)."""
    now = time.perf_counter()
    dt = (now - self._t) / self._steps
    out = dict(m, step_time=dt, tokens_per_s=self._sums["positions"] / (now - self._t),
               target_tokens_per_s=self._sums["tokens"] / (now - self._t))
    if self.flops and self.peak:
      out["mfu"] = self.flops / dt / (self.peak * jax.device_count())
    self._t, self._steps = now, 0
    self._sums = dict.fromkeys(self._sums, 0.0)
    if not self.main:
      return
    line = (f"step {step}: loss {out['loss']:.4f} lr {out['lr']:.3g} grad_norm {out['grad_norm']:.3f} "
            f"tokens/s {out['tokens_per_s']:.0f} (targets {out['target_tokens_per_s']:.0f}) "
            f"step_time {dt * 1e3:.1f}ms" + (f" mfu {out['mfu']:.1%}" if "mfu" in out else ""))
    (self.bar.write if self.bar is not None else print)(line)
    _write_scalars(self.tb, step, {f"train/{k}": v for k, v in out.items()})

  def scalars(self, step: int, scalars: dict):
    """Extra TensorBoard scalars (tag -> float, e.g. an evaluator's `eval/NAME/KEY`) at
    `step` (metrics.jsonl keeps one line per train step; evaluators write their own files)."""
    if self.main:
      _write_scalars(self.tb, step, scalars)

  def close(self, png: str | None = "loss.png"):
    if not self.main:
      return
    if self.bar is not None:
      self.bar.close()
    self.tb.close()
    self.jsonl.close()
    if png and self.history:
      save_loss_curve(self.history, os.path.join(self.workdir, png))


def _events_writer(logdir: str, purge_step: int | None):
  """A TensorBoard events file in `logdir`; purge_step: hide older runs' events from it on."""
  from tensorboardX.event_file_writer import EventsWriter
  from tensorboardX.proto.event_pb2 import Event, SessionLog
  os.makedirs(logdir, exist_ok=True)
  w = EventsWriter(os.path.join(logdir, "events"))
  if purge_step is not None:
    w.write_event(Event(step=purge_step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
  w.flush()
  return w


def _write_scalars(w, step: int, scalars: dict):
  """One event with all `scalars` (tag -> float), on disk when this returns."""
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.proto.summary_pb2 import Summary
  values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
  w.write_event(Event(step=step, wall_time=time.time(), summary=Summary(value=values)))
  w.flush()


def _truncate_jsonl(path: str, last_step: int):
  """Drops the lines of `path` (JSON with a "step") after `last_step`, atomically."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [l for l in lines if _step_of(l) <= last_step]
  if len(keep) == len(lines):
    return
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def _step_of(line: str) -> float:
  """A metrics.jsonl line's step; inf for a line a killed run left half-written."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf


def save_loss_curve(history, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps, losses = np.array(history).T
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
  ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
  k = max(1, len(losses) // 20)
  if k > 1:
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
