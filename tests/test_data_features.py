"""Movie feature files: the release's pickles read without running them, `.safetensors`
written and read back through the training data path, the `convert` CLI."""

import collections
import copyreg
import io
import json
import os
import pickle
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from llamavid_jax.data import SampleError
from llamavid_jax.data import features as ft
from llamavid_jax.data import sources
from tests import data_fixtures as fx

INPUTS = "<image>Hello there.<image><image>What a day... Let's go to the café."
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _feats(dtype=np.float16):
  return (np.arange(3 * 5 * 8, dtype=np.float32).reshape(3, 5, 8) / 7 - 4).astype(dtype)


def _release_pickle(path, obj, protocol=None):
  """As the release's extraction scripts write it: `pickle.dump` of a dict of numpy values."""
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)
  return str(path)


def _write(path, data: bytes):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _as_numpy1(data: bytes) -> bytes:
  """The same pickle as numpy 1.x writes it (`numpy.core.multiarray`): protocol 0-3 name
  globals in text lines; at protocol 4 the name is a length-prefixed string, so drop the
  (optional) frame and fix the length."""
  if data[2:3] == b"\x95":
    data = data[:2] + data[11:]
    return data.replace(b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray")
  return data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


# ---- reading the release's pickle ------------------------------------------------------


@pytest.mark.parametrize("numpy1", [False, True])
@pytest.mark.parametrize("protocol", [0, 2, 3, 4])
def test_reads_the_release_pickle(tmp_path, protocol, numpy1):
  feats = _feats()
  data = pickle.dumps({"feats": feats, "inputs": INPUTS}, protocol=protocol)
  if numpy1:
    data = _as_numpy1(data)
    assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
  movie = ft.read_movie(_write(tmp_path / "m.pkl", data))
  assert movie.feats.dtype == np.float16 and movie.feats.shape == (3, 5, 8)
  np.testing.assert_array_equal(movie.feats.view(np.uint16), feats.view(np.uint16))
  assert movie.inputs == INPUTS and movie.prompt is None and movie.num_frames == 3


def test_reads_the_release_way_default_protocol_and_plain_values(tmp_path):
  path = _release_pickle(tmp_path / "m.pkl", collections.OrderedDict(feats=_feats(np.float32), inputs=INPUTS))
  movie = ft.read_movie(path)
  assert movie.feats.dtype == np.float32 and movie.inputs == INPUTS
  # Allowed plain values (the unpickler itself; movie files only hold feats and inputs).
  value = {"s": {1, 2}, "f": frozenset("ab"), "b": bytearray(b"xy"), "t": (1.5, b"z"),
           "h": np.float16(1.5), "l": [np.int64(3)]}
  for protocol in (0, 2, 4):
    got = ft._RestrictedUnpickler(io.BytesIO(pickle.dumps(value, protocol=protocol)), "mem").load()
    assert got == value and type(got["h"]) is np.float16


def test_placeholder_count_must_match_frames(tmp_path):
  path = _release_pickle(tmp_path / "m.pkl", {"feats": _feats(), "inputs": "<image>a<image>b"})
  with pytest.raises(ft.MovieError, match=r"m\.pkl: bad_inputs: 'inputs' has 2 <image> placeholders but "
                     r"the features have 3 frames") as e:
    ft.read_movie(path)
  assert e.value.reason == "bad_inputs" and e.value.path == path
  with pytest.raises(ft.MovieError, match=r"bad_features: expected \[T, N\+1, C\] features, got shape \(3, 40\)"):
    ft.read_movie(_release_pickle(tmp_path / "flat.pkl", {"feats": _feats().reshape(3, 40), "inputs": None}))


# ---- refusing what could run code ------------------------------------------------------


class _Evil:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _Thing:
  pass


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_refuses_os_system_without_running_it(tmp_path, protocol):
  marker = tmp_path / "MARKER"
  path = _release_pickle(tmp_path / "evil.pkl",
                         {"feats": _feats(), "inputs": _Evil(f"touch {marker}")}, protocol)
  with pytest.raises(ft.UnsafePickleError, match=r"evil\.pkl: unsafe_pickle: refused to unpickle global "
                     r"(posix|os)\.system") as e:
    ft.read_movie(path)
  assert e.value.path == path and not marker.exists()


def _raw_attacks(marker):
  cmd = f"touch {marker}".encode()
  short = bytes([len(cmd)])
  return {
      "GLOBAL+REDUCE": (b"cos\nsystem\n(S'" + cmd + b"'\ntR.", "os.system"),
      "STACK_GLOBAL": (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + short + cmd + b"\x85R.", "os.system"),
      "INST": (b"(S'" + cmd + b"'\nios\nsystem\n.", "os.system"),
      "OBJ": (b"(cos\nsystem\nS'" + cmd + b"'\no.", "os.system"),
      "builtins.eval": (b"cbuiltins\neval\n(S'__import__(\"os\").system(\"" + cmd + b"\")'\ntR.", "builtins.eval"),
      "builtins.getattr": (b"cbuiltins\ngetattr\n.", "builtins.getattr"),
      "dotted name": (b"\x80\x04\x8c\x05numpy\x8c\x15ndarray.__reduce_ex__\x93.", "numpy.ndarray.__reduce_ex__"),
      "numpy.load": (b"cnumpy\nload\n.", "numpy.load"),
  }


@pytest.mark.parametrize("kind", list(_raw_attacks("M")))
def test_refuses_every_opcode_route_to_a_global(tmp_path, kind):
  marker = tmp_path / "MARKER"
  data, name = _raw_attacks(marker)[kind]
  with pytest.raises(ft.UnsafePickleError, match=rf"attack\.pkl: unsafe_pickle: refused to unpickle global "
                     rf"{name.replace('.', '[.]')}:"):
    ft.read_movie(_write(tmp_path / "attack.pkl", data))
  assert not marker.exists()


def test_refuses_extension_codes_and_persistent_ids(tmp_path):
  marker = tmp_path / "MARKER"
  copyreg.add_extension("os", "system", 0xF1)
  try:   # EXT1: the code is looked up in copyreg's registry, then through find_class
    with pytest.raises(ft.UnsafePickleError, match=r"refused to unpickle global os\.system"):
      ft.read_movie(_write(tmp_path / "ext.pkl", b"\x80\x02\x82\xf1(S'touch " + str(marker).encode() + b"'\ntR."))
  finally:
    copyreg.remove_extension("os", "system", 0xF1)
  assert not marker.exists()
  with pytest.raises(ft.UnsafePickleError, match=r"pid\.pkl: unsafe_pickle: refused a persistent id 'a'"):
    ft.read_movie(_write(tmp_path / "pid.pkl", b"\x80\x02X\x01\x00\x00\x00aQ."))


@pytest.mark.parametrize("feats", [
    np.array([[[1, "x"]]], dtype=object),
    np.zeros((1, 1, 1), dtype=[("a", "f4"), ("b", "O")]),
], ids=["object", "structured-with-object"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_object_arrays(tmp_path, feats, protocol):
  path = _release_pickle(tmp_path / "obj.pkl", {"feats": feats, "inputs": "<image>"}, protocol)
  with pytest.raises(ft.UnsafePickleError, match=r"obj\.pkl: unsafe_pickle: refused an object array \(dtype 'O"):
    ft.read_movie(path)


@pytest.mark.parametrize("value, name", [
    (collections.Counter("ab"), "collections.Counter"),
    (_Thing(), "tests.test_data_features._Thing"),
    (np.float16, "numpy.float16"),
    (ml_dtypes.bfloat16(1), "ml_dtypes.bfloat16"),   # a bf16 pickle: not what the release writes
])
def test_refuses_other_classes_naming_them(tmp_path, value, name):
  path = _release_pickle(tmp_path / "other.pkl", {"feats": _feats(), "inputs": value}, 4)
  with pytest.raises(ft.UnsafePickleError, match=rf"other\.pkl: .*global {name.replace('.', '[.]')}:"):
    ft.read_movie(path)


def test_refusals_of_format(tmp_path):
  # protocol 5 (Python >= 3.14's default) rebuilds arrays with _frombuffer: not the release's
  path = _release_pickle(tmp_path / "p5.pkl", {"feats": _feats(), "inputs": INPUTS}, 5)
  with pytest.raises(ft.UnsafePickleError, match=r"global numpy\._core\.numeric\._frombuffer"):
    ft.read_movie(path)
  with pytest.raises(ft.MovieError, match=r"z\.pkl: torch_zip: a torch\.save zip archive"):
    ft.read_movie(_write(tmp_path / "z.pkl", b"PK\x03\x04" + b"\0" * 40))
  with pytest.raises(ft.MovieError, match=r"cut\.pkl: unreadable_features: not a readable pickle: "):
    ft.read_movie(_write(tmp_path / "cut.pkl", pickle.dumps({"feats": _feats(), "inputs": INPUTS})[:100]))
  with pytest.raises(ft.MovieError, match=r"keys\.pkl: bad_features: expected the keys 'feats' and 'inputs', "
                     r"got 3 keys: \['feats', 'inputs', 'extra'\]"):
    ft.read_movie(_release_pickle(tmp_path / "keys.pkl", {"feats": _feats(), "inputs": INPUTS, "extra": 1}))
  with pytest.raises(ft.MovieError, match=r"missing_file"):
    ft.read_movie(str(tmp_path / "none.pkl"))


# ---- safetensors: writing, and reading through the training data path -----------------


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_write_safetensors_is_what_safetensors_writes(tmp_path, dtype):
  from safetensors import safe_open
  from safetensors.numpy import save_file

  movie = ft.Movie(_feats(dtype), INPUTS, "Describe it.")
  ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
  ft.write_safetensors(ours, movie)
  meta = {"format": "llamavid-movie-v1", "inputs": INPUTS, "prompt": "Describe it."}
  save_file({"features": movie.feats}, theirs, metadata=meta)
  a, b = open(ours, "rb").read(), open(theirs, "rb").read()
  (na,), (nb,) = struct.unpack("<Q", a[:8]), struct.unpack("<Q", b[:8])
  assert na == nb and json.loads(a[8:8 + na]) == json.loads(b[8:8 + nb]) and a[8 + na:] == b[8 + nb:]
  with safe_open(ours, framework="numpy") as f:
    assert f.metadata() == meta and f.keys() == ["features"]
  back = ft.read_movie(ours)
  assert back.feats.dtype == np.dtype(dtype) and back.inputs == INPUTS and back.prompt == "Describe it."
  np.testing.assert_array_equal(back.feats.view(np.uint8), movie.feats.view(np.uint8))
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_converted_movie_reads_back_through_the_training_path(tmp_path):
  from llamavid_jax.data import pipeline as pl

  feats = _feats()
  root = fx.make_root(str(tmp_path / "root"))
  videos = os.path.join(root, "videos")
  pkl = _release_pickle(os.path.join(videos, "movie.pkl"), {"feats": feats, "inputs": INPUTS})
  assert ft.main(["convert", pkl, os.path.join(videos, "converted.safetensors")]) == 0
  ft.write_safetensors(os.path.join(videos, "direct.safetensors"), ft.Movie(feats, INPUTS))
  movies = [sources.load_movie(os.path.join(videos, f"{n}.safetensors")) for n in ("converted", "direct")]
  for m in movies:
    assert m.feats.dtype == np.float16 and m.inputs == INPUTS and m.prompt is None
    np.testing.assert_array_equal(m.feats.view(np.uint16), feats.view(np.uint16))
  got, prompt = sources.load_features(os.path.join(videos, "converted.safetensors"))
  assert got.dtype == np.float32 and prompt is None
  np.testing.assert_array_equal(got, feats.astype(np.float32))
  # The pipeline on a LLaVA JSON pointing at both files: the same rows.
  q = fx.qa("<image>\nWhat is this?", "A cat.")
  data = fx.write_dataset(root, [{"id": n, "video": f"{n}.safetensors", "conversations": q}
                                 for n in ("converted", "direct")])
  cfg = pl.PipelineConfig(data_path=data, video_folder=videos, llm_tokenizer=os.path.join(root, "llm"),
                          qformer_tokenizer=os.path.join(root, "bert"), template="vicuna_v1",
                          buckets=((40, 4),), batch_size=2, max_len=64, qformer_max_len=8, max_frames=4,
                          read_threads=0)
  it = iter(pl.make_pipeline(cfg, fx.SPEC, shard_index=0, shard_count=1))
  (batch,) = list(it)
  it.close()
  assert sorted(batch["sample_index"].tolist()) == [0, 1]
  for row in batch["features"]:
    np.testing.assert_array_equal(row[:3], feats.astype(np.float32))
  assert batch["frame_mask"].tolist() == [[True] * 3 + [False]] * 2


def test_training_path_refuses_pickles_and_bad_inputs(tmp_path):
  from safetensors.numpy import save_file

  pkl = _release_pickle(tmp_path / "m.pkl", {"feats": _feats(), "inputs": INPUTS})
  with pytest.raises(SampleError, match=r"pickle_features: .*python -m llamavid_jax\.data\.features convert"):
    sources.load_features(pkl)
  with pytest.raises(SampleError, match=r"pickle_features: .*python -m llamavid_jax\.data\.features convert"):
    sources.refuse_pickle(sources.RawSample(0, "0", None, "features", pkl))
  path = str(tmp_path / "bad.safetensors")
  save_file({"features": _feats()}, path, metadata={"inputs": "<image>"})
  with pytest.raises(SampleError, match=r"field 'video' \(file .*bad\.safetensors\): bad_inputs: 'inputs' has "
                     r"1 <image> placeholders but the features have 3 frames"):
    sources.load_features(path)


# ---- the CLI ----------------------------------------------------------------------------


def test_convert_cli_on_a_directory(tmp_path, capsys):
  src, out = tmp_path / "in", tmp_path / "out"
  (src / "sub").mkdir(parents=True)
  (src / "notes.txt").write_text("not a movie")
  for name in ("a.pkl", "sub/b.pkl", "c.pkl"):
    _release_pickle(src / name, {"feats": _feats(), "inputs": INPUTS})
  marker = tmp_path / "MARKER"
  _release_pickle(src / "evil.pkl", {"feats": _feats(), "inputs": _Evil(f"touch {marker}")})
  out.mkdir()
  (out / "c.safetensors").write_bytes(b"already there")
  assert ft.main(["convert", str(src), str(out)]) == 1
  text = capsys.readouterr().out
  assert f"FAILED {src}/evil.pkl: unsafe_pickle: refused to unpickle global posix.system" in text
  assert f"skipped {src}/c.pkl -> {out}/c.safetensors (exists)" in text
  assert text.splitlines()[-1] == "4 file(s): converted 2, skipped 1 (output exists), failed 1"
  assert sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs) == [
      "a.safetensors", "c.safetensors", "sub/b.safetensors"]
  assert (out / "c.safetensors").read_bytes() == b"already there" and not marker.exists()
  assert ft.read_movie(str(out / "sub" / "b.safetensors")).inputs == INPUTS
  # Again: everything converted is skipped; the bad file still fails.
  assert ft.main(["convert", str(src), str(out)]) == 1
  assert capsys.readouterr().out.splitlines()[-1] == "4 file(s): converted 0, skipped 3 (output exists), failed 1"
  os.remove(src / "evil.pkl")
  assert ft.main(["convert", str(src), str(out)]) == 0
  (tmp_path / "empty").mkdir()
  assert ft.main(["convert", str(tmp_path / "empty"), str(out)]) == 2
  assert "no .pkl files under" in capsys.readouterr().err


def test_convert_cli_one_file_as_a_module(tmp_path):
  pkl = _release_pickle(tmp_path / "movie.pkl", {"feats": _feats(), "inputs": INPUTS})
  out = tmp_path / "movie.safetensors"
  run = subprocess.run([sys.executable, "-m", "llamavid_jax.data.features", "convert", pkl, str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr
  assert run.stdout.splitlines()[-1] == "1 file(s): converted 1, skipped 0 (output exists), failed 0"
  assert ft.read_movie(str(out)).inputs == INPUTS
