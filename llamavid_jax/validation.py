"""One validation layer for every CLI: flags, budgets and output paths are checked here,
before a model is loaded or compiled, and every problem is said in one line.

- `check_sampling`: temperature finite and >= 0, top_p in (0, 1], top_k >= 0,
  max_new_tokens >= 1, prefill_chunk >= 0 -> a list of problems (empty: fine).
- `position_budget` / `check_positions`: a request's LLM positions (prompt ids with each
  `<image>` expanded to frames x tokens_per_frame, plus max_new_tokens) against the
  model's `llm.max_positions` x `llm.rope_scaling` (linear RoPE scaling stretches the
  positions the model was trained on by that factor). `default_frame_cap` is the frame
  cap of a checkpoint that stores none: the frames that fit the budget beside a short
  prompt and answer.
- `check_optimizer`: an optimizer config's numbers positive and finite.
- `check_out`: an output path that is, or is the same file as, one of the command's
  inputs is refused; `write_atomic` writes through a temporary file and a rename.
- `capped`: a long list of like problems as one summary line ("2,949 videos missing,
  first 5: ..."); `held_logs`: a library's log records held back while a load that may
  fail runs (a failure is said once, by our error).

- `device_memory`: XLA running out of device memory (RESOURCE_EXHAUSTED) in a load,
  a prefill or a decode becomes one line naming the plan command to run
  (`plan_command`: `python -m train.plan --inference ...` with what is known filled in).

Errors: `UsageError` (a flag or config value: exit 2 in `cli.run`), `BudgetError`
(a request that does not fit the model: exit 1) and `DeviceMemoryError` (exit 1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

# prompt + answer positions assumed by `default_frame_cap` (a one-line question, a short answer)
DEFAULT_TEXT_POSITIONS = 128


class UsageError(ValueError):
  """A flag, config value or output path that cannot be used (exit 2)."""


class BudgetError(ValueError):
  """A request that needs more LLM positions than the model has (exit 1)."""

  def __init__(self, needed: int, budget: int, detail: str):
    super().__init__(f"the request needs {needed:,} LLM positions ({detail}); the model has "
                     f"{budget:,} (llm.max_positions x rope_scaling)")
    self.needed, self.budget = needed, budget


def _finite(x) -> bool:
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


# --- sampling -------------------------------------------------------------------------
def check_sampling(*, temperature: float | None = None, top_p: float | None = None, top_k: int | None = 0,
                   max_new_tokens: int | None = 1, prefill_chunk: int | None = 0,
                   prefix: str = "--") -> list[str]:
  """Problems with sampling values (None: not given, fine). `prefix` names the flags
  (`--top-p`) or fields (`top_p` with prefix "")."""
  def name(f):
    return prefix + (f.replace("_", "-") if prefix == "--" else f)
  errs = []
  if temperature is not None and not (_finite(temperature) and temperature >= 0):
    errs.append(f"{name('temperature')} must be a finite number >= 0 (0: greedy), got {temperature}")
  if top_p is not None and not (_finite(top_p) and 0 < top_p <= 1):
    errs.append(f"{name('top_p')} must be in (0, 1], got {top_p}")
  if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
    errs.append(f"{name('top_k')} must be an integer >= 0 (0: off), got {top_k}")
  if max_new_tokens is not None and not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
    errs.append(f"{name('max_new_tokens')} must be an integer >= 1, got {max_new_tokens}")
  if prefill_chunk is not None and not (isinstance(prefill_chunk, int) and prefill_chunk >= 0):
    errs.append(f"{name('prefill_chunk')} must be an integer >= 0 (0: all at once), got {prefill_chunk}")
  return errs


def raise_all(errs: Sequence[str], error=UsageError) -> None:
  """Raises `error` with every problem, joined in one line, if there is any."""
  if errs:
    raise error("; ".join(errs))


# --- position budget ------------------------------------------------------------------
def position_budget(cfg) -> int:
  """LLM positions the model has: llm.max_positions x llm.rope_scaling."""
  return int(cfg.llm.max_positions * max(float(cfg.llm.rope_scaling), 1.0))


def request_positions(cfg, prompt_ids: int, num_frames: int, *, movie: bool = False, placeholders: int = 1) -> int:
  """LLM positions of a prompt of `prompt_ids` ids (`placeholders` of them `<image>`)
  with `num_frames` frames: clip mode expands each placeholder to all frames x
  tokens_per_frame, movie mode each of the T placeholders to one frame's tokens."""
  k = cfg.tokens_per_frame
  if not num_frames or not placeholders:
    return prompt_ids
  if movie:
    return prompt_ids + placeholders * (k - 1)
  return prompt_ids + placeholders * (num_frames * k - 1)


def check_positions(cfg, *, prompt_ids: int, num_frames: int, max_new_tokens: int, movie: bool = False,
                    placeholders: int = 1, what: str = "") -> int:
  """Raises BudgetError (naming `what`, the positions needed and the budget) unless the
  prompt, its frames and max_new_tokens fit the model -> positions needed."""
  budget = position_budget(cfg)
  prompt = request_positions(cfg, prompt_ids, num_frames, movie=movie, placeholders=placeholders)
  need = prompt + max_new_tokens
  if need > budget:
    frames = prompt - prompt_ids + placeholders if num_frames and placeholders else 0
    detail = (f"{prompt_ids:,} prompt ids, {num_frames:,} frames x {cfg.tokens_per_frame} tokens = "
              f"{frames:,}, {max_new_tokens:,} new tokens")
    err = BudgetError(need, budget, detail)
    if what:
      err.args = (f"{what}: {err.args[0]}",)
    raise err
  return need


def default_frame_cap(cfg, text_positions: int = DEFAULT_TEXT_POSITIONS) -> int:
  """Frames a checkpoint without a frame cap takes: those that fit the budget beside
  `text_positions` of prompt and answer (at most a quarter of the budget; at least 1 frame)."""
  budget = position_budget(cfg)
  return max(1, (budget - min(text_positions, budget // 4)) // max(cfg.tokens_per_frame, 1))


# --- optimizer ------------------------------------------------------------------------
_POSITIVE = ("lr", "learning_rate", "peak_lr", "eps")
_NON_NEGATIVE = ("weight_decay", "warmup_ratio", "warmup_steps", "min_lr", "end_lr", "end_lr_ratio", "min_lr_ratio",
                 "clip_norm", "max_grad_norm")   # clip_norm 0: no clipping (train/optim.py)


def check_optimizer(optim: Mapping[str, Any] | Any, prefix: str = "optim.") -> list[str]:
  """Problems with an optimizer config (a mapping or an object with attributes): every
  number finite; learning rate and eps positive; betas in (0, 1); weight decay, warmup,
  clipping (0: none) and the end learning rate >= 0; warmup_ratio <= 1."""
  if hasattr(optim, "keys"):   # a dict or an ml_collections ConfigDict
    keys, get = list(optim.keys()), (lambda k: optim[k])
  else:   # a dataclass or a plain object
    keys = [k for k in vars(optim) if not k.startswith("_")]
    get = lambda k: getattr(optim, k)   # noqa: E731
  errs = []
  for k in keys:
    v = get(k)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      continue
    if not _finite(v):
      errs.append(f"{prefix}{k} must be finite, got {v}")
    elif k in ("b1", "b2", "beta1", "beta2") and not 0 < v < 1:
      errs.append(f"{prefix}{k} must be in (0, 1), got {v}")
    elif k in _POSITIVE and v <= 0:
      errs.append(f"{prefix}{k} must be > 0, got {v}")
    elif k in _NON_NEGATIVE and v < 0:
      errs.append(f"{prefix}{k} must be >= 0, got {v}")
    elif k == "warmup_ratio" and v > 1:
      errs.append(f"{prefix}{k} must be <= 1, got {v}")
  return errs


# --- output paths ---------------------------------------------------------------------
def same_file(a: str, b: str) -> bool:
  """Whether paths a and b name one file (equal after normalising, or the same inode)."""
  if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def check_out(out: str | None, inputs: Mapping[str, str | None], flag: str = "--out") -> list[str]:
  """Problems with writing `out`: it is (or is the same file as) one of `inputs`
  ({flag or name: path})."""
  if not out:
    return []
  return [f"{flag} {out} is the same file as {name} {path}: refusing to overwrite an input"
          for name, path in inputs.items() if path and same_file(out, path)]


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file beside it and a rename (a kill
  leaves the old file or the new one, never half of one)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# --- messages -------------------------------------------------------------------------
@contextlib.contextmanager
def held_logs(logger: str = "absl"):
  """The records `logger` logs while the block runs (orbax logs through absl's) held back:
  passed on when the block ends well, dropped when it raises, so that a failure is said
  once, by the error naming it, not also by a library's warning about the same failure."""
  log, held = logging.getLogger(logger), []

  def hold(record: logging.LogRecord) -> bool:
    held.append(record)
    return False

  log.addFilter(hold)
  try:
    yield
  finally:
    log.removeFilter(hold)
  for record in held:
    log.handle(record)


def capped(what: str, entries: Iterable[str], first: int = 5) -> str:
  """'{n:,} {what}, first 5: a; b; ...' (all of them when there are no more than `first`)."""
  entries = list(entries)
  head = "; ".join(entries[:first])
  if len(entries) <= first:
    return f"{len(entries):,} {what}: {head}"
  return f"{len(entries):,} {what}, first {first}: {head}"


def one_line(text: str, limit: int = 500) -> str:
  """`text` on one line, cut to `limit` characters with the count of the rest."""
  text = " ".join(str(text).split())
  return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


# --- out of device memory --------------------------------------------------------------
PLAN_COMMAND = "python -m train.plan --inference"


class DeviceMemoryError(RuntimeError):
  """The device ran out of memory (XLA's RESOURCE_EXHAUSTED): one line naming what ran
  and the plan command that says what fits (exit 1)."""


def is_out_of_memory(e: BaseException) -> bool:
  """Whether `e` is XLA's out-of-device-memory error (jax's XlaRuntimeError RESOURCE_EXHAUSTED)."""
  import jax
  return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def _device_target() -> str:
  """--gpu / --topology of the devices this process has, where hardware.py knows them."""
  import jax
  from llamavid_jax import hardware
  devices = jax.devices()
  chip = hardware.for_device_kind(devices[0].device_kind)
  if chip is None:
    return "--topology <slice, or --gpu 24GB|80GB>"
  if not chip.is_tpu:
    return f"--gpu {chip.name}"
  return f"--topology {chip.libtpu}-{len(devices) * chip.cores_per_chip}"


def plan_command(*, ckpt: str | None = None, seq_len: int | None = None, new_tokens: int | None = None,
                 quant: str | None = None, rows: int | None = None, dtype: str | None = None,
                 target: str | None = None, kv_cache: str | None = None) -> str:
  """`python -m train.plan --inference ...` with what is known filled in (placeholders
  for the rest)."""
  parts = [PLAN_COMMAND, f"--ckpt {ckpt}" if ckpt else "--ckpt <checkpoint>", target or _device_target(),
           f"--seq-len {seq_len}" if seq_len else "--seq-len <prompt positions>"]
  parts += [f"--new-tokens {new_tokens}"] if new_tokens is not None else []
  parts += [f"--batch {rows}"] if rows and rows > 1 else []
  parts += [f"--quant {quant}"] if quant else []
  parts += [f"--kv-cache {kv_cache}"] if kv_cache else []
  parts += [f"--dtype {dtype}"] if dtype and dtype != "bfloat16" else []
  return " ".join(parts)


@contextlib.contextmanager
def device_memory(what: str, **known):
  """Re-raises XLA's out-of-device-memory error inside as a one-line DeviceMemoryError
  naming `what` ran out and the plan command (`plan_command(**known)`)."""
  try:
    yield
  except Exception as e:   # noqa: BLE001  (only RESOURCE_EXHAUSTED is changed)
    if not is_out_of_memory(e):
      raise
    raise DeviceMemoryError(f"{what}: out of device memory ({one_line(str(e).splitlines()[0], 200)}); see what "
                            f"fits with: {plan_command(**known)}") from e
