"""Evaluators during training, declared in the config (big_vision's `config.evals`).

  c.evals.heldout = dict(bench="msvd_qa", every=0,          # steps between runs; 0: after the last step
                         args=dict(question_file=".../heldout_qa.json", video_folder=".../videos"),
                         batch_size=64, max_new_tokens=8, temperature=0.0, limit=0)

`bench` names an `eval.benchmarks` module and `args` are its command-line arguments
(`--question-file` -> `question_file`), the same files `python -m eval.run BENCH` takes.
Each evaluator runs that module on the current parameters through `eval.predict`
(batched greedy generation unless `temperature` > 0; `limit` > 0 takes the first
`limit` questions), writes the predictions in the benchmark's own format to
WORKDIR/evals/NAME/step_N.jsonl with the summary next to it (step_N.summary.json),
and logs every number of the metric summary as the TensorBoard scalar
`eval/NAME/KEY` and one console line. `check` (from train.train.check_config) refuses
unknown benchmarks, keys and arguments; the question files are read when training
starts, before anything is built, so a wrong path fails before compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time

log = logging.getLogger("train.evaluators")

DEFAULTS = dict(every=0, args={}, batch_size=8, max_new_tokens=64, temperature=0.0, top_p=1.0, limit=0)


def _spec(name: str, e) -> dict:
  e = dict(e)
  unknown = set(e) - set(DEFAULTS) - {"bench"}
  if unknown:
    raise ValueError(f"config.evals.{name}: unknown keys {sorted(unknown)} (known: bench, {', '.join(DEFAULTS)})")
  if "bench" not in e:
    raise ValueError(f"config.evals.{name}: no `bench` (an eval.benchmarks module)")
  return {**DEFAULTS, **e}


def _args(name: str, spec: dict):
  """The benchmark module and its argparse Namespace from `spec["args"]`."""
  from eval.benchmarks import BENCHMARKS
  if spec["bench"] not in BENCHMARKS:
    raise ValueError(f"config.evals.{name}.bench={spec['bench']!r}: not one of {sorted(BENCHMARKS)}")
  mod = BENCHMARKS[spec["bench"]]
  p = argparse.ArgumentParser(prog=f"config.evals.{name}.args", add_help=False)
  mod.add_arguments(p)
  args = p.parse_args([])
  known = vars(args)
  for k, v in dict(spec["args"]).items():
    if k not in known:
      raise ValueError(f"config.evals.{name}.args.{k}: not an argument of {spec['bench']} (known: {sorted(known)})")
    setattr(args, k, v)
  args.benchmark = spec["bench"]
  return mod, args


def bench_args(name: str, e):
  """config.evals.NAME -> (the benchmark module, its argparse Namespace)."""
  return _args(name, _spec(name, e))


def check(c) -> None:
  """Raises ValueError naming the key for every evaluator that cannot run."""
  for name, e in (c.get("evals") or {}).items():
    spec = _spec(name, e)
    for k in ("every", "batch_size", "max_new_tokens", "limit"):
      if not isinstance(spec[k], int) or spec[k] < (1 if k in ("batch_size", "max_new_tokens") else 0):
        raise ValueError(f"config.evals.{name}.{k}={spec[k]!r}: must be a {'positive' if k in ('batch_size', 'max_new_tokens') else 'non-negative'} integer")
    _args(name, spec)


def _check_files(name: str, mod, args) -> None:
  """The benchmark's files exist (checked when training starts, not by check_config: a
  recipe is checked before its data is made)."""
  from eval.benchmarks import common
  errs = common.check_paths(getattr(mod, "FILES", {}), args, "run") + (mod.check(args, "run") if hasattr(mod, "check") else [])
  if errs:
    raise FileNotFoundError(f"config.evals.{name}: " + "; ".join(errs))


def prepare(name: str, e) -> tuple[dict, object, argparse.Namespace, list]:
  """config.evals.NAME -> (its settings, the benchmark module, its arguments, its
  questions: the files checked, the first `limit` loaded)."""
  spec = _spec(name, e)
  mod, args = _args(name, spec)
  _check_files(name, mod, args)
  items = mod.load(args)
  return spec, mod, args, items[:spec["limit"]] if spec["limit"] else items


def answer(model, spec: dict, mod, args, items: list) -> tuple[list, list[dict], dict]:
  """The evaluator's answers to `items` from `model` (an inference.Model) through
  `eval.predict` with `spec`'s generation settings -> (answers, the benchmark's
  records, its metric summary)."""
  from eval.predict import Predictor
  with Predictor(model, batch_size=spec["batch_size"], max_new_tokens=spec["max_new_tokens"],
                 temperature=spec["temperature"], top_p=spec["top_p"]) as pred:   # its engine (and cache) freed after
    answers = pred.predict(items)
  records = [mod.record(it, p) for it, p in zip(items, answers)]
  return answers, records, mod.score(records, args)


class Evaluators:
  """The config's evaluators, their questions loaded once; `maybe_run` after each step."""

  def __init__(self, c):
    from llamavid_jax.models.config import from_dict
    self.c, self.workdir = c, c.workdir
    self.evals = []
    for name, e in (c.get("evals") or {}).items():
      self.evals.append((name, *prepare(name, e)))
    self._tokenizers = None
    self.model_cfg = from_dict(c.model)

  def __bool__(self) -> bool:
    return bool(self.evals)

  def due(self, step: int, last: bool) -> list:
    return [e for e in self.evals if (e[1]["every"] and step % e[1]["every"] == 0) or last]

  def _model(self, params):
    from llamavid_jax import inference
    from llamavid_jax.checkpoint.orbax_io import Inference, data_provenance
    from llamavid_jax.data import tokenizer as tok_lib
    if self._tokenizers is None:
      d = self.c.data
      self._tokenizers = (tok_lib.load_llm_tokenizer(d.llm_tokenizer),
                          tok_lib.load_qformer_tokenizer(d.qformer_tokenizer, max_length=d.qformer_len))
    cfg = self.model_cfg
    if cfg.attention_impl == "ring":   # decoding runs outside the training mesh's shard_map
      cfg = dataclasses.replace(cfg, attention_impl="chunked")
    meta = data_provenance(self.c.data)   # sample frames and images as the training data
    return inference.Model(Inference(cfg, params, *self._tokenizers, meta))

  def maybe_run(self, step: int, params, last: bool, log_scalars) -> dict:
    """Runs the evaluators due at `step` -> {name: metric summary}; `log_scalars(step,
    {tag: value})` writes TensorBoard scalars."""
    due = self.due(step, last)
    if not due:
      return {}
    model = self._model(params)
    out = {}
    for name, spec, mod, args, items in due:
      t = time.perf_counter()
      _, records, summary = answer(model, spec, mod, args, items)
      seconds = time.perf_counter() - t
      out[name] = summary
      scalars = {f"eval/{name}/{k}": float(v) for k, v in _numbers(summary).items()}
      log_scalars(step, scalars)
      folder = os.path.join(self.workdir, "evals", name)
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, f"step_{step}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
      with open(os.path.join(folder, f"step_{step}.summary.json"), "w") as f:
        json.dump(dict(benchmark=spec["bench"], step=step, metric=summary, items=len(items), seconds=seconds), f,
                  indent=1)
      print(f"[eval] step {step} {name} ({spec['bench']}, {len(items)} questions, {seconds:.0f}s): "
            + ", ".join(f"{k.split('/', 2)[2]} {v:.4g}" for k, v in scalars.items()), flush=True)
    return out


def _numbers(d: dict, prefix: str = "") -> dict:
  """The numeric leaves of a (nested) summary, keys joined with '/'."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_numbers(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[f"{prefix}{k}"] = v
  return out
