"""TFDS ArrayRecord roundtrip: build from LLaVA JSON + media, read without TensorFlow."""

import os
import sys

import numpy as np
import pytest

from llamavid_jax.data import DataError
from llamavid_jax.data import pipeline as pl
from llamavid_jax.data import tfds_builder
from tests import data_fixtures as fx




@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  fx.make_root(root)
  samples = fx.image_samples(root, 4)
  samples += [{"id": "txt", "conversations": fx.qa("Hello", "Hi.")}]
  np.save(os.path.join(root, "videos", "f0.npy"), np.ones((3, 5, 8), np.float32))
  samples += [{"id": "feat", "video": "f0.npy", "conversations": fx.qa("<image>\nWhat is this?", "A cat.")},
              {"id": "gone", "image": "nope.png", "conversations": fx.qa("<image>\nWhat?", "A cat.")}]
  path = fx.write_dataset(root, samples)
  folders = dict(image_folder=os.path.join(root, "images"), video_folder=os.path.join(root, "videos"))
  ds_dir = tfds_builder.build_dataset(path, os.path.join(root, "tfds"), fx.SPEC, max_skip_rate=0.5,
                                      **folders)
  return root, path, folders, ds_dir


def _config(root, **kw):
  return pl.PipelineConfig(
      llm_tokenizer=os.path.join(root, "llm"), qformer_tokenizer=os.path.join(root, "bert"),
      template="vicuna_v1", buckets=((32, 1), (36, 1), (40, 4)), batch_size=2,
      max_len=64, qformer_max_len=8, max_frames=4, read_threads=0,
      max_skip_rate=0.5, min_samples_for_skip_rate=1, **kw)


def test_records_without_tensorflow(built):
  _, _, _, ds_dir = built
  src = tfds_builder.TfdsSource(ds_dir)
  assert "tensorflow" not in sys.modules
  assert len(src) == 6  # the missing image was skipped at build time
  assert [src[i].id for i in range(6)] == ["img0", "img1", "img2", "img3", "txt", "feat"]
  s = src[1]
  assert s.kind == "frames" and s.frames.shape == (1, 16, 16, 3) and s.frames.dtype == np.uint8
  assert s.conversations == fx.qa("<image>\nWhat is this?", "A cat.")
  assert src[4].kind == "none" and src[5].kind == "features" and src[5].features.shape == (3, 5, 8)
  assert sorted(os.listdir(ds_dir))[0].startswith("dataset_info")
  assert any(f.endswith("array_record-00000-of-00001") for f in os.listdir(ds_dir))


def test_roundtrip_equals_json_pipeline(built):
  root, path, folders, ds_dir = built
  from_json = pl.make_pipeline(_config(root, data_path=path, **folders), fx.SPEC, shard_index=0, shard_count=1)
  from_tfds = pl.make_pipeline(_config(root, tfds_dir=ds_dir), fx.SPEC, shard_index=0, shard_count=1)
  a, b = list(from_json), list(from_tfds)
  assert len(a) == len(b) == 4  # 4 images / 2, 1 text, 1 features (padded)
  # Same samples, same arrays (sample_index differs: JSON index vs record index).
  def rows(batches):
    return [{k: v[i] for k, v in bt.items() if k != "sample_index"}
            for bt in batches for i in range(2) if bt["sample_index"][i] >= 0]

  key = lambda r: (r["input_ids"].tobytes(), r.get("frames", r.get("features")).tobytes())
  ra, rb = sorted(rows(a), key=key), sorted(rows(b), key=key)
  assert len(ra) == len(rb) == 6
  for x, y in zip(ra, rb):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_build_stops_past_skip_rate(built, tmp_path):
  root, _, folders, _ = built
  path = fx.write_dataset(str(tmp_path), [
      {"id": "gone", "image": "nope.png", "conversations": fx.qa("<image>\nWhat?", "A cat.")}])
  with pytest.raises(DataError, match=r"skip rate 1/1 = 1\.000 exceeds max_skip_rate 0\.5 building "
                     r".*\.json; last: sample 'gone' \(index 0\) field 'image' \(file .*nope\.png\): "
                     r"missing_file: file not found; by reason: \{'missing_file': 1\}"):
    tfds_builder.build_dataset(path, str(tmp_path / "tfds"), fx.SPEC, max_skip_rate=0.5, **folders)
