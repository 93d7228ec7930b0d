"""Long-video (movie) feature files: the release's pickles, read without running them,
and the `.safetensors` files training and inference read instead.

What the release writes (`scripts/extra_tool/extract_video_features_subtitles.py` and
`extract_movienet_features.py`): one movie per file, `pickle.dump(dict(feats=..., inputs=...))`
with the default protocol (4 on Python >= 3.8). `feats` is a **numpy** float16 array
[T, 257, 1408] (the EVA-ViT output is moved to the CPU and converted with
`.numpy().astype("float16")` before pickling), so the file is a plain pickle holding numpy
arrays, not a `torch.save` zip archive and no torch tensor; the release reads it back
with `pickle.load` (`train/train.py`, `serve/run_llamavid_movie.py`). `inputs` is
`"<image>" + subtitles of frame 0 + "<image>" + subtitles of frame 1 + ...`: one placeholder
per frame.

Reading (`read_movie`):
  .pkl          the restricted unpickler below: only the globals on `ALLOWED_GLOBALS` are
                ever looked up, so a pickle that would call anything else (`os.system`, ...)
                raises `UnsafePickleError` naming the global and the file, and nothing of it
                runs. Object arrays (dtype `O`) are refused, too. A `torch.save` zip is not
                read (the release never writes one).
  .safetensors  tensor `features` (or the only tensor); `inputs` and `prompt` (the Q-Former
                instruction) from the metadata.
  .npy          the array only (`allow_pickle=False`).
The features keep their stored dtype (float16, bfloat16 via ml_dtypes, float32). A movie
is checked: features [T > 0, N+1, C], and `inputs`, when present, holds exactly T `<image>`.

Writing (`write_safetensors`): tensor `features` in its stored dtype, metadata
`{"format": "llamavid-movie-v1", "inputs": ..., "prompt": ...}` (those present), streamed
from the array (no second copy of a multi-GB movie) and renamed into place when complete.

CLI:
  python -m llamavid_jax.data.features convert IN.pkl OUT.safetensors
  python -m llamavid_jax.data.features convert IN_DIR OUT_DIR
A directory is walked for `*.pkl` (recursively; OUT_DIR mirrors the layout, `.safetensors`
for `.pkl`). Existing outputs are skipped; each failure is printed with its reason; the
exit status is 1 if any file failed.

Making these files from videos needs a checkpoint (the ViT), so that command is in the
serving layer: `python -m llamavid_jax.extract` (`llamavid_jax/extract.py`).
"""

from __future__ import annotations

import argparse
import builtins
import collections
import dataclasses
import json
import os
import pickle
import shlex
import struct
import sys
from typing import Any

import numpy as np

IMAGE_TOKEN = "<image>"   # = llamavid_jax.data.IMAGE_TOKEN (not imported: keeps this module standalone)
FORMAT = "llamavid-movie-v1"
SUFFIXES = (".pkl", ".safetensors", ".npy")


class MovieError(ValueError):
  """A movie feature file that cannot be read or written.

  Attributes:
    reason: short tag: `missing_file`, `unreadable_features`, `bad_features` (shape),
      `bad_inputs` (placeholders vs frames), `unsafe_pickle`, `torch_zip`.
    detail: human-readable explanation.
    path: the file.
  """

  def __init__(self, reason: str, detail: str, path: str):
    self.reason, self.detail, self.path = reason, detail, path
    super().__init__(f"{path}: {reason}: {detail}")


class UnsafePickleError(MovieError):
  """A pickle that asks for a global not on `ALLOWED_GLOBALS`, an object array, or a
  persistent id: refused before anything of it is called."""

  def __init__(self, detail: str, path: str):
    super().__init__("unsafe_pickle", detail, path)


@dataclasses.dataclass(frozen=True)
class Movie:
  """One movie's features and text.

  Attributes:
    feats: [T, N+1, C] ViT features (with CLS), in their stored dtype.
    inputs: the release's `"<image>" + subtitles + "<image>" + ...` (T placeholders), if any.
    prompt: the Q-Former instruction stored with the features, if any.
  """

  feats: np.ndarray
  inputs: str | None = None
  prompt: str | None = None

  @property
  def num_frames(self) -> int:
    return int(self.feats.shape[0])


# ---- the restricted unpickler ----------------------------------------------------------

# Every (module, name) a pickle may look up, and nothing else. The release's files (protocol
# 4, numpy 1.x) use the first three; numpy 2 writes `numpy._core`; numpy scalars use
# `scalar`; protocols 0-2 write bytes as `_codecs.encode(str, "latin1")` and protocols < 4
# sets as `set(list)`; the other builtins and OrderedDict are plain containers and values.
# Protocols 0-2 spell `builtins` as Python 2's `__builtin__` (the pickler's `fix_imports`):
# read as `builtins`, as `pickle.load` does.
ALLOWED_GLOBALS = (
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("builtins", "int"), ("builtins", "float"),
    ("collections", "OrderedDict"),
)


def _multiarray():
  try:
    from numpy._core import multiarray    # numpy >= 2 (numpy.core is its deprecated alias there)
  except ImportError:   # pragma: no cover - older numpy
    from numpy.core import multiarray
  return multiarray


class _RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose `find_class` answers only `ALLOWED_GLOBALS`.

  Every global of a pickle (GLOBAL, STACK_GLOBAL, INST, OBJ's class, EXT* extension codes)
  is looked up through `find_class`, and REDUCE / NEWOBJ / BUILD can only call or
  construct objects that came from it or from the plain-value opcodes: refusing here means
  nothing else is ever called. The table maps names to objects directly (no import, no
  attribute walk: `numpy.ndarray.__reduce__` is not `numpy.ndarray`). `numpy.dtype`,
  `scalar` and `_codecs.encode` are wrapped to refuse object dtypes and non-latin1 uses."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self.path = path
    mm = _multiarray()
    self._table = {
        ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): self._dtype,
        ("numpy.core.multiarray", "scalar"): self._scalar,
        ("numpy._core.multiarray", "scalar"): self._scalar,
        ("_codecs", "encode"): self._latin1,
        ("collections", "OrderedDict"): collections.OrderedDict,
        **{(m, n): getattr(builtins, n) for m, n in ALLOWED_GLOBALS if m == "builtins"},
        ("builtins", "bytes"): self._bytes(bytes), ("builtins", "bytearray"): self._bytes(bytearray),
    }
    assert set(self._table) == set(ALLOWED_GLOBALS)

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._table[("builtins" if module == "__builtin__" else module, name)]
    except (KeyError, TypeError):
      raise UnsafePickleError(f"refused to unpickle global {module}.{name}: only numpy arrays, "
                              "strings, numbers and plain containers are read (nothing was run)",
                              self.path) from None

  def persistent_load(self, pid):
    raise UnsafePickleError(f"refused a persistent id {str(pid)[:80]!r}: not a plain pickle", self.path)

  def _refuse_object(self, what: str):
    raise UnsafePickleError(f"refused an object array ({what}): its elements are arbitrary "
                            "Python objects, not features", self.path)

  def _dtype(self, spec, align=False, copy=False):
    if not isinstance(spec, str):   # numpy's own reduce always passes a type string ("f2", "V16", ...)
      raise UnsafePickleError(f"refused numpy.dtype({type(spec).__name__}): not a dtype string", self.path)
    dt = np.dtype(spec, align=bool(align), copy=bool(copy))
    if dt.hasobject:
      self._refuse_object(f"dtype {spec!r}")
    return dt

  def _scalar(self, dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
      self._refuse_object(f"scalar of dtype {dtype!r}")
    return _multiarray().scalar(dtype, data)

  def _reconstruct(self, subtype, shape, dtype):
    # numpy's reduce always starts from an empty array, (0,): any other shape would allocate
    # it here, from a few bytes of pickle (the size bound: data come from the file itself)
    if subtype is not np.ndarray or not isinstance(shape, tuple) or shape != (0,):
      raise UnsafePickleError(f"refused numpy _reconstruct of shape {str(shape)[:80]}: numpy's own pickles "
                              "start from an empty array; this one would allocate memory the file does not hold",
                              self.path)
    return _multiarray()._reconstruct(subtype, shape, dtype)

  def _bytes(self, kind):
    def make(*args):
      if args and not isinstance(args[0], (bytes, bytearray, str)):   # bytes(10**9): zeros from nothing
        raise UnsafePickleError(f"refused {kind.__name__}({type(args[0]).__name__}): only bytes held in the file "
                                "are read", self.path)
      return kind(*args)
    return make

  def _latin1(self, s, encoding="utf-8"):
    if not isinstance(s, str) or encoding != "latin1":
      raise UnsafePickleError(f"refused _codecs.encode({type(s).__name__}, {encoding!r}): only the "
                              "protocol's latin1 bytes are read", self.path)
    return s.encode("latin1")


_ZIP_MAGIC = b"PK\x03\x04"


def _read_pickle(path: str) -> Movie:
  with open(path, "rb") as f:
    if f.read(4) == _ZIP_MAGIC:
      raise MovieError("torch_zip", "a torch.save zip archive, not the release's plain pickle of numpy "
                       "arrays; not read (load it with torch.load(weights_only=True) and save the numpy "
                       "arrays)", path)
    f.seek(0)
    try:
      obj = _RestrictedUnpickler(f, path).load()
    except MovieError:
      raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
      raise MovieError("unreadable_features", f"not a readable pickle: {type(e).__name__}: {e}"[:300],
                       path) from None
  if not isinstance(obj, dict):
    raise MovieError("bad_features", f"expected a dict with 'feats' and 'inputs', got {type(obj).__name__}",
                     path)
  if "feats" not in obj or set(obj) - {"feats", "inputs"}:
    keys = [str(k)[:40] for k in list(obj)[:5]]   # a dict of a million keys gives one short line
    more = f" and {len(obj) - 5:,} more" if len(obj) > 5 else ""
    raise MovieError("bad_features", f"expected the keys 'feats' and 'inputs', got {len(obj):,} keys: "
                     f"{keys}{more}", path)
  feats, inputs = obj["feats"], obj.get("inputs")
  if type(feats) is not np.ndarray:
    raise MovieError("bad_features", f"'feats' is a {type(feats).__name__}, expected a numpy array", path)
  if feats.dtype.hasobject:   # the dtype wrapper refuses these; kept as a last check
    raise UnsafePickleError(f"refused an object array (dtype {feats.dtype})", path)
  if inputs is not None and not isinstance(inputs, str):
    raise MovieError("bad_inputs", f"'inputs' is a {type(inputs).__name__}, expected a str", path)
  size = os.path.getsize(path)
  if feats.nbytes > size:   # a plain pickle holds its arrays' bytes: anything larger was made up
    raise UnsafePickleError(f"refused features of {feats.nbytes:,} bytes from a file of {size:,} bytes", path)
  return Movie(feats, inputs)


# ---- safetensors / npy ------------------------------------------------------------------


def file_errors() -> tuple[type[BaseException], ...]:
  """What numpy and safetensors raise for a broken feature file (evaluated only when
  something was raised, so safetensors loads lazily): OSError (I/O, mmap),
  ValueError (bad header, pickled data refused), EOFError (empty `.npy`),
  SafetensorError (bad `.safetensors` header), TypeError (a dtype numpy lacks)."""
  from safetensors import SafetensorError

  return (OSError, ValueError, EOFError, TypeError, SafetensorError)


def tensor_key(keys, path: str) -> str:
  """The features' tensor of a `.safetensors` file: `features`, or its only tensor."""
  keys = list(keys)
  if "features" in keys:
    return "features"
  if len(keys) == 1:
    return keys[0]
  raise MovieError("unreadable_features", f"expected one tensor or one named 'features', found {keys}", path)


def _read_stored(path: str) -> Movie:
  try:
    if path.endswith(".npy"):
      return Movie(np.load(path, allow_pickle=False))
    import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors asks for)
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
      feats = f.get_tensor(tensor_key(f.keys(), path))
      meta = f.metadata() or {}
    return Movie(feats, meta.get("inputs"), meta.get("prompt"))
  except MovieError:
    raise
  except file_errors() as e:
    raise MovieError("unreadable_features", f"{type(e).__name__}: {e}", path) from None


def check_movie(movie: Movie, path: str) -> Movie:
  """`movie` if its features are [T > 0, N+1, C] and `inputs` (when present) has T
  placeholders; raises `MovieError` naming `path` and both counts otherwise."""
  shape = tuple(movie.feats.shape)
  if len(shape) != 3 or shape[0] == 0:
    raise MovieError("bad_features", f"expected [T, N+1, C] features, got shape {shape}", path)
  if movie.inputs is not None:
    check_inputs(movie.inputs, shape[0], path)
  return movie


def check_finite(feats: np.ndarray, path: str) -> None:
  """Raises `MovieError` (`bad_features`, naming `path`, the count and the first frame)
  if any feature is NaN or infinite; checked a frame at a time (no copy of the movie)."""
  bad, first = 0, None
  for t in range(feats.shape[0]):
    n = feats[t].size - int(np.isfinite(feats[t]).sum())
    if n and first is None:
      first = t
    bad += n
  if bad:
    raise MovieError("bad_features", f"{bad:,} feature values are NaN or infinite (first in frame {first})", path)


def check_inputs(inputs: str, num_frames: int, path: str) -> None:
  """Raises `MovieError` (`bad_inputs`, naming `path` and both counts) unless `inputs`
  holds exactly one `<image>` per frame."""
  n = inputs.count(IMAGE_TOKEN)
  if n != num_frames:
    raise MovieError("bad_inputs", f"'inputs' has {n} {IMAGE_TOKEN} placeholders but the features "
                     f"have {num_frames} frames", path)


def read_movie(path: str) -> Movie:
  """The movie of a `.pkl` (the release's, restricted unpickling), `.safetensors` or
  `.npy` file, checked (`check_movie`); raises `MovieError` (`UnsafePickleError` for a
  pickle that asks for more than arrays and plain values)."""
  if not path.endswith(SUFFIXES):
    raise MovieError("unreadable_features", f"unknown feature file type (expected one of {SUFFIXES})", path)
  if not os.path.exists(path):
    raise MovieError("missing_file", "file not found", path)
  if path.endswith(".pkl"):
    try:
      movie = _read_pickle(path)
    except OSError as e:
      raise MovieError("unreadable_features", f"{type(e).__name__}: {e}", path) from None
  else:
    movie = _read_stored(path)
  return check_movie(movie, path)


def _safetensors_dtype(dt: np.dtype) -> str | None:
  if dt.name == "bfloat16":
    return "BF16"
  return {"float16": "F16", "float32": "F32", "float64": "F64"}.get(dt.name)


def write_safetensors(path: str, movie: Movie) -> None:
  """Writes `movie` as a `.safetensors` file: tensor `features` (stored dtype kept) and
  metadata `format` = "llamavid-movie-v1", `inputs`, `prompt` (those present). The data
  are streamed from the array into `path`.tmp, renamed to `path` once complete."""
  check_movie(movie, path)
  feats = movie.feats
  code = _safetensors_dtype(feats.dtype)
  if code is None:
    raise MovieError("bad_features", f"features of dtype {feats.dtype}: expected float16, bfloat16, "
                     "float32 or float64", path)
  if feats.dtype.byteorder == ">":
    feats = feats.astype(feats.dtype.newbyteorder("<"))
  feats = np.ascontiguousarray(feats)
  meta = {"format": FORMAT}
  meta.update({k: v for k, v in (("inputs", movie.inputs), ("prompt", movie.prompt)) if v is not None})
  header = {"__metadata__": meta,
            "features": {"dtype": code, "shape": list(feats.shape), "data_offsets": [0, feats.nbytes]}}
  head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  head += b" " * (-len(head) % 8)    # the data start 8-aligned, as safetensors writes them
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(head)))
      f.write(head)
      f.write(feats.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ---- CLI --------------------------------------------------------------------------------


def _convert_one(src: str, dst: str) -> str:
  """Converts one `.pkl` to `.safetensors`: "converted" or "skipped" (`dst` exists);
  raises `MovieError` / `OSError`."""
  if os.path.exists(dst):
    return "skipped"
  movie = read_movie(src)
  check_finite(movie.feats, src)
  os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
  write_safetensors(dst, movie)
  return "converted"


def _pairs(src: str, out: str) -> list[tuple[str, str]]:
  """(input .pkl, output .safetensors) for a file or every `*.pkl` under a directory."""
  if not os.path.isdir(src):
    if os.path.isdir(out):
      out = os.path.join(out, os.path.splitext(os.path.basename(src))[0] + ".safetensors")
    return [(src, out)]
  pairs = []
  for d, dirs, files in os.walk(src):
    dirs.sort()
    for name in sorted(files):
      if name.endswith(".pkl"):
        rel = os.path.relpath(os.path.join(d, name), src)
        pairs.append((os.path.join(src, rel), os.path.join(out, rel[:-len(".pkl")] + ".safetensors")))
  return pairs


def convert(src: str, out: str, *, log=print) -> dict[str, int]:
  """Converts the `.pkl` file `src` to the file `out` (or into the directory `out`), or
  every `*.pkl` under the directory `src` into the directory `out` (same layout).
  Returns the counts {"converted", "skipped", "failed"}; logs each file and failure."""
  counts = {"converted": 0, "skipped": 0, "failed": 0}
  if not os.path.exists(src):
    raise MovieError("missing_file", "file or directory not found", src)
  if not os.path.isdir(src) and not src.endswith(".pkl"):
    raise MovieError("unreadable_features", "expected a .pkl file or a directory of them", src)
  for s, d in _pairs(src, out):
    try:
      what = _convert_one(s, d)
    except (MovieError, OSError) as e:
      counts["failed"] += 1
      detail = f"{e.reason}: {e.detail}" if isinstance(e, MovieError) else f"{type(e).__name__}: {e}"
      log(f"FAILED {s}: {detail}")
      continue
    counts[what] += 1
    log(f"{what} {s} -> {d}" + (" (exists)" if what == "skipped" else ""))
  return counts


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m llamavid_jax.data.features",
                              description="Long-video (movie) feature files.")
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="the release's .pkl movie files -> .safetensors (never runs the pickle)")
  c.add_argument("input", help="a .pkl file, or a directory walked for *.pkl")
  c.add_argument("output", help="the .safetensors file (for one input) or the output directory")
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["extract"]:   # it loads a checkpoint: serving, not data
    print("error: `extract` moved: python -m llamavid_jax.extract " + shlex.join(argv[1:]), file=sys.stderr)
    return 2
  a = p.parse_args(argv)
  if a.command == "convert":
    if os.path.isdir(a.input) and os.path.exists(a.output) and not os.path.isdir(a.output):
      p.error(f"{a.output}: the output of a directory must be a directory")
    try:
      counts = convert(a.input, a.output)
    except MovieError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    total = sum(counts.values())
    print(f"{total} file(s): converted {counts['converted']}, skipped {counts['skipped']} (output exists), "
          f"failed {counts['failed']}")
    if total == 0:
      print(f"error: no .pkl files under {a.input}", file=sys.stderr)
      return 2
    return 1 if counts["failed"] else 0
  return 2   # pragma: no cover - argparse requires a command


if __name__ == "__main__":
  sys.exit(main())
