"""What takes a compiled step's memory, from XLA's dumps (`--xla_dump_to`): the bytes
live at the peak (`dumped_peak`) and the largest buffers live there (`peak_buffers`),
read with regexes from the buffer assignment's live-range file and the optimized HLO;
and the per-device sizes of a step XLA refused for being over HBM (`oom_sizes`)."""

from __future__ import annotations

import glob
import math
import os
import re
import shutil

import jax
import numpy as np

from train.planning.aot import DUMP_MODULES

_LIVE = re.compile(r"^\s+(\S+?)(\{[\d,]*\})?: (\d+) bytes")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) [\w-]+\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TEMPORARIES = re.compile(r"temporaries \(([\d.]+)([KMGT])\)")


def _live_range_file(dump_dir: str) -> str | None:
  files = sorted(glob.glob(os.path.join(dump_dir, f"*{DUMP_MODULES}*after_optimizations-live-range.txt")))
  return files[-1] if files else None


def dumped_peak(dump_dir: str) -> int | None:
  """The bytes live at the step's peak, as XLA's live-range dump sums them."""
  path = _live_range_file(dump_dir)
  if path:
    with open(path) as f:
      m = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", f.read())
    if m:
      return int(m.group(1).replace(" ", ""))
  return None


def _element(shape: str, index: str) -> str:
  """The element at ShapeIndex `index` ("{1}", "{0,2}", "") of an HLO shape string."""
  for i in (int(x) for x in index.strip("{}").split(",") if x):
    if not shape.startswith("("):
      return shape
    parts, depth, start = [], 0, 1
    for j, ch in enumerate(shape):
      depth += ch in "([{" and 1 or ch in ")]}" and -1 or 0
      if (ch == "," and depth == 1) or j == len(shape) - 1:
        parts.append(shape[start:j].strip())
        start = j + 1
    shape = parts[i] if i < len(parts) else shape
  return shape


def peak_buffers(dump_dir: str, top: int = 12) -> list[dict]:
  """The buffers live at the step's memory peak, largest first: [{bytes, name, shape,
  memory, op}] from XLA's dumped live ranges (`*-live-range.txt`) and optimized HLO
  (shapes, the memory space: "host" for layouts in S(5), and the jax op that made each:
  `op_name` metadata). [] where XLA dumped none."""
  path = _live_range_file(dump_dir)
  if not path:
    return []
  live, on = [], False
  with open(path) as f:
    for line in f:
      if "(peak):" in line:
        on = True
        continue
      if on:
        m = _LIVE.match(line)
        if not m:
          break
        live.append((int(m.group(3)), m.group(1), m.group(2) or ""))
  live.sort(reverse=True)
  wanted = {name for _, name, _ in live}
  info = {}
  hlo = path.replace("-live-range.txt", ".txt")
  if os.path.exists(hlo):
    with open(hlo) as f:
      for line in f:
        m = _INSTR.match(line)
        if m and m.group(1) in wanted:
          op = _OP_NAME.search(line)
          info[m.group(1)] = (m.group(2), op.group(1) if op else "")
  out = []
  for size, name, idx in live:
    shape, op = info.get(name, ("", ""))
    shape = _element(shape, idx)
    out.append(dict(bytes=size, name=name + idx, shape=re.sub(r"\{[^}]*\}", "", shape)[:120],
                    memory="host" if "S(5)" in shape else "device", op=op))
  device = [b for b in out if b["memory"] == "device"]
  return device[:top] + [b for b in out if b["memory"] == "host"][:max(top // 4, 1)]


def clear(dump_dir: str) -> None:
  """Empties the dump directory (the next plan's files only)."""
  for f in glob.glob(os.path.join(dump_dir, "*")):
    shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)


def tree_bytes(tree, host: bool) -> int:
  """Bytes per device of a tree of sharded ShapeDtypeStructs in host (or device) memory."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if host == bool(x.sharding.memory_kind and "host" in x.sharding.memory_kind))


def oom_sizes(message: str, batch, state, dump_dir: str | None) -> tuple[dict, int, int]:
  """Per-device sizes of a step XLA refused (over HBM): arguments from the shardings,
  outputs = the donated state (aliased), temporaries from the error's figure ("HLO
  temporaries (314.90G)") or, failing that, the dumped peak. -> (sizes, total, host)."""
  args = tree_bytes(state, False) + tree_bytes(batch, False)
  out = tree_bytes(state, False)
  m = _TEMPORARIES.search(message)
  if m:
    temp = float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)
  else:
    temp = max((dumped_peak(dump_dir) or 0) - args, 0) if dump_dir else 0
  sizes = dict(argument_bytes=args, temp_bytes=temp, output_bytes=out, alias_bytes=out)
  return sizes, int(args + temp), tree_bytes(batch, True)
