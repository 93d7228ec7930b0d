"""Benchmarks: one module each, `BENCHMARKS[name]` (imported on first use).

Every module has
  KIND                  "generate" (the release generates every answer, letters included)
  GENERATION            the release's sampling for it: {temperature, max_new_tokens}
  FILES                 {args attribute: ("file" | "dir", modes needing it: "run" / "score")}
  add_arguments(parser) its flags (the release's names: --question-file, --image-folder, ...)
  load(args)            -> [common.Item] from the benchmark's own question files
  record(item, pred, model_id="...") -> one prediction in the release's output layout
  score(records, args)  -> metric summary (a dict; counts only where a judge is needed)
and may have `check(args, mode)` (more argument problems), `key(record)` (its name in a
prediction file; default common.default_key on ID_FIELD) and `export(records, path,
args)` (the release's downstream file: GQA's predictions, VQAv2 / MMBench submissions,
Video-ChatGPT's joined consistency lines) and `predictor(args)` (the model side, where the
runner's default `eval.predict` over `inference.load` does not fit: the needle's frame
chunks and RoPE factors). `args.benchmark` is the name it runs under (video_qa serves three).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

_MODULES = {
    "msvd_qa": "video_qa", "msrvtt_qa": "video_qa", "activitynet_qa": "video_qa",
    "video_chatgpt": "video_chatgpt", "gqa": "gqa", "pope": "pope", "mme": "mme",
    "scienceqa": "scienceqa", "mmbench": "mmbench", "vqav2": "vqav2", "needle": "needle",
}


class _Registry(Mapping):
  def __getitem__(self, name):
    if name not in _MODULES:
      raise KeyError(f"unknown benchmark {name!r}; one of {sorted(_MODULES)}")
    return importlib.import_module(f"eval.benchmarks.{_MODULES[name]}")

  def __iter__(self):
    return iter(_MODULES)

  def __len__(self):
    return len(_MODULES)


BENCHMARKS = _Registry()
