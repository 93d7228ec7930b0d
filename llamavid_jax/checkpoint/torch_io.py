"""Safe reading and writing of PyTorch-side weight files, one file at a time.

* `.bin` / `.pth` go through `torch.load(weights_only=True)`: the unpickler only
  rebuilds tensors and plain containers, so a pickle that would run code is refused
  (`UnsafePickleError`) and the code never runs; a file that is not a complete torch
  file (truncated, empty, a Git LFS pointer) is a `CorruptCheckpointError`. Files in
  torch's zip format are memory-mapped (`mmap=True`): a shard's tensors are paged in
  as they are converted.
  torch is imported only here and only for these files (an optional extra).
* `.safetensors` is read with the `safetensors` package's numpy API (bf16 through
  ml_dtypes), never importing torch.

Every tensor comes out as a numpy array of its stored dtype (bf16 as ml_dtypes).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping

import numpy as np

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class UnsafePickleError(RuntimeError):
  """A `.bin`/`.pth` whose pickle holds more than tensors (it could run code)."""


class CheckpointFormatError(ValueError):
  """A weight file or directory that is not laid out as expected."""


class CorruptCheckpointError(CheckpointFormatError):
  """A `.bin`/`.pth` that is not a complete torch file (truncated, empty, another format)."""


def _import_torch():
  try:
    import torch
  except ImportError:
    raise ImportError("reading .bin/.pth weights needs PyTorch (the optional `torch` extra); "
                      "safetensors files do not") from None
  return torch


def torch_to_numpy(t) -> np.ndarray:
  """A CPU torch tensor -> numpy array of the same dtype (bf16 via ml_dtypes), no copy."""
  torch = _import_torch()
  t = t.detach()
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_to_torch(a: np.ndarray):
  torch = _import_torch()
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(np.array(a, copy=True).view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.array(a, copy=True))   # restored arrays may be read-only


_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy header: PROTO n, then the magic number pickled as LONG1 (10 bytes)
_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _format_of(path: str) -> str:
  """The format of a torch file: "zip" (torch's default) or "legacy" (one pickle
  stream); raises `CorruptCheckpointError` naming the file when it is neither."""
  with open(path, "rb") as f:
    head = f.read(32)
  if head.startswith(_ZIP_MAGIC):
    if not zipfile.is_zipfile(path):
      raise CorruptCheckpointError(f"{path}: corrupt or truncated: a zip archive without its central "
                                   f"directory ({os.path.getsize(path)} bytes); download it again")
    return "zip"
  if head[:1] == b"\x80" and head[2:14] == _LEGACY_MAGIC:
    return "legacy"
  what = ("a Git LFS pointer, not the weights" if head.startswith(b"version https://git-lfs")
          else "empty" if not head else f"starts with {head[:8]!r}")
  raise CorruptCheckpointError(f"{path}: corrupt or truncated: neither a torch zip archive nor a torch "
                               f"pickle ({what}, {os.path.getsize(path)} bytes)")


def _refused_globals(e: Exception) -> bool:
  """Whether torch's weights-only unpickler refused a global/class (a pickle that
  could run code), as opposed to bytes it cannot parse."""
  return isinstance(e, pickle.UnpicklingError) and bool(re.search(r"GLOBAL|[Uu]nsupported (global|class)", str(e)))


def load_pickled(path: str) -> dict:
  """`.bin` / `.pth` -> its (nested) dict of torch tensors, weights-only. Raises
  `UnsafePickleError` naming the file if the pickle holds anything else, and
  `CorruptCheckpointError` if the file is not a (complete) torch file."""
  torch = _import_torch()
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  kind = _format_of(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
  except Exception as e:
    lines = str(e).strip().splitlines()
    first = next((l for l in reversed(lines) if "Unsupported" in l or "GLOBAL" in l), lines[-1] if lines else "")
    if _refused_globals(e):
      raise UnsafePickleError(
          f"{path}: refused to load: its pickle holds objects other than tensors and plain "
          f"containers, which could run code (torch weights_only loading: {first[:300]})") from None
    raise CorruptCheckpointError(f"{path}: corrupt or truncated {kind} torch file: "
                                 f"{type(e).__name__}: {(first or repr(e))[:300]}") from e


def _flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, object]]:
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield prefix + str(k), v


def iter_tensors(path: str, select: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """(key, numpy array) for every tensor of one weight file, one at a time (memory-
  mapped where the format allows, so one file's data is never all resident at once).
  `select` picks a sub-dict of a pickled file (e.g. "model" for LAVIS `.pth` files that
  wrap the state dict); non-tensor entries of a pickle are ignored."""
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        yield k, f.get_tensor(k)
    return
  obj = load_pickled(path)
  if select is not None:
    if not isinstance(obj, Mapping) or select not in obj:
      raise CheckpointFormatError(f"{path}: expected a dict with key {select!r}")
    obj = obj[select]
  if not isinstance(obj, Mapping):
    raise CheckpointFormatError(f"{path}: expected a state dict, got {type(obj).__name__}")
  torch = _import_torch()
  for k, v in _flatten(obj):
    if isinstance(v, torch.Tensor):
      yield k, torch_to_numpy(v)


def read_file(path: str, select: str | None = None) -> dict[str, np.ndarray]:
  """All tensors of one weight file as {key: numpy array}."""
  return dict(iter_tensors(path, select))


def shapes_of_file(path: str, select: str | None = None) -> dict[str, tuple[int, ...]]:
  """{key: shape} of one weight file, without reading tensor data
  (safetensors header; pickles are mmapped)."""
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        out[k] = tuple(f.get_slice(k).get_shape())
    return out
  return {k: tuple(v.shape) for k, v in iter_tensors(path, select)}


def shard_files(model_dir: str) -> list[str]:
  """The weight files of an HF model directory, in index order: from
  `*.index.json` (weight_map) or a single `model.safetensors`/`pytorch_model.bin`."""
  for name in INDEX_FILES:
    idx = os.path.join(model_dir, name)
    if os.path.exists(idx):
      with open(idx) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{idx}: no weight_map")
      files = list(dict.fromkeys(weight_map.values()))
      missing = [f for f in files if not os.path.exists(os.path.join(model_dir, f))]
      if missing:
        raise CheckpointFormatError(f"{idx}: shard files missing: {missing}")
      return [os.path.join(model_dir, f) for f in files]
  for name in SINGLE_FILES:
    if os.path.exists(os.path.join(model_dir, name)):
      return [os.path.join(model_dir, name)]
  raise CheckpointFormatError(f"{model_dir}: no {' / '.join(INDEX_FILES + SINGLE_FILES)}")


def write_safetensors_shards(tensors: Iterator[tuple[str, np.ndarray]], out_dir: str,
                             max_shard_bytes: int = 5 << 30, prefix: str = "model") -> list[str]:
  """Writes (key, array) pairs in order as `{prefix}-0000i-of-0000n.safetensors` shards
  of at most `max_shard_bytes` plus `{prefix}.safetensors.index.json`; holds one shard
  in memory at a time. Returns the shard file names."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  shards: list[list[str]] = []
  weight_map: dict[str, int] = {}
  buf: dict[str, np.ndarray] = {}
  size = total = 0
  tmp_names = []

  def flush():
    nonlocal buf, size
    if buf:
      name = f"{prefix}-shard{len(tmp_names)}.tmp"
      save_file(buf, os.path.join(out_dir, name), metadata={"format": "pt"})
      tmp_names.append(name)
      shards.append(list(buf))
      buf, size = {}, 0

  for key, arr in tensors:
    if buf and size + arr.nbytes > max_shard_bytes:
      flush()
    buf[key] = np.ascontiguousarray(arr)
    size += arr.nbytes
    total += arr.nbytes
  flush()
  n = len(tmp_names)
  names = [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for tmp, name, keys in zip(tmp_names, names, shards):
    os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
    weight_map.update({k: name for k in keys})
  with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
