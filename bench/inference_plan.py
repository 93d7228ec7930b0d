"""Which hardware for which inference job: `train.plan --inference` over a grid of
models, workloads, weight formats and targets; one JSON line per plan as it is made,
then the markdown table of docs/inference_hardware.md.

  PYTHONPATH=.:<libtpu site-packages> python bench/inference_plan.py [--only required] > plans.jsonl

Workloads (LLM positions of the prompt, plus 512 answer tokens of cache):
  short   the stage-2 recipe's longest bucket: 1024 text tokens + 512 frames of a clip
          (the ViT runs on the frames)
  1h      a movie of ~11K positions (stage-3 recipe, movie mode: 3072 frames of
          features at 1 fps, 51 min, + subtitles)
  3h      ~24K positions (10240 frames, 2.8 h)
  64K     65536 positions (30720 frames, 8.5 h: the stage-3 recipe's training length)
Single-device targets (24 GB GPU, 80 GB GPU, v5e-1) share one plan per model x workload
x weights: the GPU estimate's (exact bytes, temporaries of a one-layer compile by the TPU
compiler); v5e-4 and v5p-8 are compiled for their slices (bf16 only in this grid).
"""

import argparse
import json
import sys

from configs import stage2_instruct_7b, stage3_long_video_7b
from llamavid_jax.models.config import from_dict
from train.planning import inference as I
from train.planning.policy import Shape

WORKLOADS = {"short": (stage2_instruct_7b, None), "1h": (stage3_long_video_7b, 11264),
             "3h": (stage3_long_video_7b, 24576), "64K": (stage3_long_video_7b, 65536)}
GIB = 1 << 30
SHORT = Shape(1024 + 512 * 2 - 1, 1024, 512, 1, "the stage-2 recipe's video bucket: 1024 text + 512 frames")
SINGLE = {"24 GB GPU": 24 * GIB, "80 GB GPU": 80 * GIB, "v5e-1": 16 * GIB}
SLICES = ("v5e-4", "v5p-8")
# the rows asked for first (issue #23): (size, workload, quant, kv_cache, target)
REQUIRED = [("7b", "1h", "int8", None, "24GB"), ("7b", "3h", "int8", "int8", "24GB"),
            ("13b", "short", "int8", None, "24GB"), ("7b", "64K", None, None, "v5e-4"),
            ("7b", "64K", None, None, "80GB"), ("7b", "1M", None, None, "v5p-8")]


def one(size, work, quant, kv, target_name):
  mod, seq = WORKLOADS.get(work, (stage3_long_video_7b, 1 << 20))
  c = mod.get_config(f"size={size}")
  cfg = from_dict(c.model)
  gpu = target_name if target_name.endswith("GB") else None
  tgt = I.target(target_name, gpu)
  # short: the recipe's video bucket (its longest is an image bucket of 64 one-frame prompts)
  row = SHORT if work == "short" else I.prompt_row(cfg, seq, c)
  p = I.plan_inference(cfg, tgt, row, quant=quant, kv_cache=kv,
                       features=bool(c.data.get("use_features")) or cfg.movie)
  p.update(size=size, workload=work)
  print(json.dumps(p), flush=True)
  return p


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", choices=("required", "grid", "all"), default="all")
  ap.add_argument("--skip", default=None, help="a JSON-lines file of plans made already: their cases are skipped")
  a = ap.parse_args()
  done = set()
  if a.skip:
    with open(a.skip) as f:
      for line in f:
        p = json.loads(line)
        if "per_device_bytes" in p:
          kv = None if p["kv_cache"] == p["dtype"] else p["kv_cache"]
          done.add((p["size"], p["workload"], p["quant"], kv, "24GB" if p["estimate"] else p["target"]))
  if a.only in ("required", "all"):
    for case in REQUIRED:
      if case in done or case[-1].endswith("GB") and case[:-1] + ("24GB",) in done:
        continue
      try:
        one(*case)
      except Exception as e:   # noqa: BLE001  (a row that cannot be planned is said, the rest go on)
        print(json.dumps(dict(case=case, error=f"{type(e).__name__}: {e}"[:500])), flush=True)
  if a.only in ("grid", "all"):   # bf16 everywhere first, then the quantized single-device plans
    cases = [(size, work, None, None, t) for size in ("7b", "13b") for work in WORKLOADS for t in ("24GB",) + SLICES]
    cases += [(size, work, q, None, "24GB") for q in ("int8", "int4") for size in ("7b", "13b") for work in WORKLOADS]
    for case in cases:
      if case not in done:
        try:
          one(*case)
        except Exception as e:   # noqa: BLE001
          print(json.dumps(dict(case=case, error=f"{type(e).__name__}: {e}"[:500])), flush=True)


def quant_weight_bytes() -> dict:
  """{(size, workload, quant): weight bytes on one device}: Qwix's quantized arrays shaped
  abstractly (no compile: seconds)."""
  import jax
  from llamavid_jax import sharding
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  out = {}
  for size in ("7b", "13b"):
    for work, (mod, _) in WORKLOADS.items():
      cfg = I.model_config(from_dict(mod.get_config(f"size={size}").model), 2048, 512)
      for q in (None, "int8", "int4"):
        out[(size, work, q or "bf16")] = I.tree_device_bytes(I.abstract_params(cfg, mesh, q)[1])
  return out


def _bf16_cache(p) -> tuple[int, int]:
  """A single-device plan's (prefill, decode) bytes with a bf16 cache in place of its
  int8 one (prefill holds one cache, `generate`'s decode two)."""
  if p["kv_cache"] == p["dtype"]:
    return p["prefill_bytes"], p["decode_bytes"]
  llm = from_dict(WORKLOADS[p["workload"]][0].get_config(f"size={p['size']}").model).llm
  d = 2 * llm.num_layers * p["rows"] * p["cache_slots"] * llm.num_kv_heads * llm.head_dim * 2 - p["kv_cache_bytes"]
  return p["prefill_bytes"] + d, p["decode_bytes"] + p["caches_live_in_decode"] * d


def markdown(lines) -> str:
  """The docs table from the JSON lines: a cell is `fits total-GiB`; * an estimate (one
  device: the GPU estimate's bytes, for v5e-1 too); + derived from a plan of the same job
  in another weight format (its weights swapped for these, counted exactly; its
  temporaries kept) or with an int8 KV cache (a bf16 cache counted in its place)."""
  plans = [p for p in (json.loads(l) for l in lines if l.strip()) if "per_device_bytes" in p]
  cell, base = {}, {}
  for p in plans:
    w = p["quant"] or "bf16"
    if p["estimate"]:
      prefill, decode = _bf16_cache(p)
      derived = "+" if p["kv_cache"] != p["dtype"] else ""
      if not derived or (p["size"], p["workload"], w) not in base:
        base[(p["size"], p["workload"], w)] = (prefill, decode, derived)
    elif p["kv_cache"] == p["dtype"]:
      cell[(p["size"], p["workload"], w, p["target"])] = (p["per_device_bytes"], p["fits"], "")
  weights = quant_weight_bytes()
  for (size, work, w), (prefill, decode, derived) in list(base.items()):
    for q in ("bf16", "int8", "int4"):
      dw = weights[(size, work, q)] - weights[(size, work, w)]
      t = max(prefill, decode) + dw
      mark = "*" + ("+" if derived or q != w else "")
      for name, hbm in SINGLE.items():
        if (size, work, q, name) not in cell or not derived and q == w:
          if q == w or (size, work, q) not in base:
            cell[(size, work, q, name)] = (t, t <= hbm, mark)
  cols = list(SINGLE) + list(SLICES)
  out = ["| model | job | weights | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
  for size in ("7b", "13b"):
    for work in WORKLOADS:
      for w in ("bf16", "int8", "int4"):
        row = []
        for col in cols:
          v = cell.get((size, work, w, col))
          if v is None:
            row.append("n/a" if col in SLICES and w != "bf16" else "not planned")
          else:
            row.append(f"{'**yes**' if v[1] else 'no'} {v[0] / GIB:.1f}{v[2]}")
        out.append(f"| {size.upper()} | {work} | {w} | " + " | ".join(row) + " |")
  return "\n".join(out)


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--markdown":
    with open(sys.argv[2]) as f:
      print(markdown(f.readlines()))
  else:
    main()
