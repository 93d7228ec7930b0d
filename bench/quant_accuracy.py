"""Held-out accuracy of a trained model with quantized weights or KV cache (CPU).

  python bench/quant_accuracy.py --workdir workdir/demo/context [--root .] [--modes fp32,int8,int4,kv-int8]

Takes a `train.train` WORKDIR (`make demo`'s workdir/demo/context), loads its exported
inference directory (WORKDIR/inference) once per mode with `inference.load` (fp32
compute; `int8` / `int4`: `quant=`, the LLM's weights quantized with Qwix as they are
read; `kv-int8`: `kv_cache="int8"`) and asks it the run's own held-out evaluator
(WORKDIR/config.json's `evals`, `train/evaluators.py`: the benchmark module, its
questions, batch size and greedy decoding budget), scored by the benchmark (exact match
for the demo's msvd_qa). Relative paths in the config are taken from `--root` (where
the run was started). Prints per mode the accuracy, its difference from fp32 and the
fraction of questions answered exactly as fp32 did; and the run's own figure at its
last step (WORKDIR/evals/NAME/step_N.summary.json) next to fp32's.

Measured (2-core dev CPU, shared and loaded: load average 11-15; `make demo`'s context
model, step 1600; python bench/quant_accuracy.py --workdir /work/main/workdir/demo/context
--root /work/main): the run's own evaluation 94.50; fp32 94.50, int8 94.50 (+0.00, same
answers as fp32 on 1.000 of the 200 questions), int4 94.50 (+0.00, 1.000), int8 KV cache
94.50 (+0.00, 1.000); 104-147 s a mode. The demo's answers are one or two tokens from a
model whose greedy choices are confident, so no mode changed a single answer.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = {"fp32": {}, "int8": dict(quant="int8"), "int4": dict(quant="int4"), "kv-int8": dict(kv_cache="int8")}


def evaluators(workdir: str, root: str) -> dict:
  """WORKDIR/config.json's `evals`, relative paths in their args joined to `root`."""
  with open(os.path.join(workdir, "config.json")) as f:
    evals = json.load(f).get("evals") or {}
  if not evals:
    raise SystemExit(f"{workdir}/config.json: no evals (the run declared no held-out evaluator)")
  rel = lambda v: os.path.join(root, v) if isinstance(v, str) and not os.path.isabs(v) else v
  return {name: dict(e, args={k: rel(v) for k, v in e.get("args", {}).items()}) for name, e in evals.items()}


def run_figure(workdir: str, name: str) -> tuple[int, dict] | None:
  """(step, metric) of the run's own last evaluation of `name`, if it wrote one."""
  found = glob.glob(os.path.join(workdir, "evals", name, "step_*.summary.json"))
  if not found:
    return None
  path = max(found, key=lambda p: int(os.path.basename(p).split("_")[1].split(".")[0]))
  with open(path) as f:
    s = json.load(f)
  return s["step"], s["metric"]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True, help="a train.train WORKDIR with inference/ and config.json")
  p.add_argument("--root", default=".", help="the directory the run started in (its config's relative paths)")
  p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
  p.add_argument("--metric", default="exact", help="the summary key to report (msvd_qa: exact, percent)")
  p.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
  a = p.parse_args()
  modes = a.modes.split(",")
  bad = [m for m in modes if m not in MODES]
  if bad or modes[0] != "fp32":
    p.error(f"--modes: {bad or modes} (known: {', '.join(MODES)}; fp32 first, the reference)")
  ckpt = os.path.join(a.workdir, "inference")
  if not os.path.isdir(ckpt):
    p.error(f"--workdir: no {ckpt} (the run exports it at its last step)")

  from llamavid_jax import inference
  from train import evaluators as E
  for name, e in evaluators(a.workdir, a.root).items():
    if a.limit:
      e = dict(e, limit=a.limit)
    spec, mod, args, items = E.prepare(name, e)
    print(f"{name}: {spec['bench']}, {len(items)} questions, batch {spec['batch_size']}, "
          f"max_new_tokens {spec['max_new_tokens']}, temperature {spec['temperature']}; load average "
          f"{os.getloadavg()}", flush=True)
    own = run_figure(a.workdir, name)
    if own:
      print(f"  the run's own evaluation at step {own[0]}: {a.metric} {own[1][a.metric]:.2f}", flush=True)
    ref = None
    print(f"  {'mode':<8} {a.metric:>7} {'vs fp32':>8} {'same answers as fp32':>21} {'seconds':>8}", flush=True)
    for mode in modes:
      t = time.perf_counter()
      m = inference.load(ckpt, dtype="float32", **MODES[mode])
      answers, _, summary = E.answer(m, spec, mod, args, items)
      del m
      if ref is None:
        ref = (answers, summary[a.metric])
      same = sum(x == y for x, y in zip(answers, ref[0])) / len(answers)
      print(f"  {mode:<8} {summary[a.metric]:>7.2f} {summary[a.metric] - ref[1]:>+8.2f} "
            f"{same:>21.3f} {time.perf_counter() - t:>8.0f}", flush=True)
  print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
  main()
