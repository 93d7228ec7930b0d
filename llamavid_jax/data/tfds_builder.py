"""LLaVA JSON + media folders -> a TFDS ArrayRecord dataset, read back without TF.

Writing: `build_dataset(...)` runs `LlavaMedia` (a `tfds.core.GeneratorBasedBuilder`)
with `file_format="array_record"`. TFDS 4.9 encodes features with numpy and writes
ArrayRecord through `array_record`: TensorFlow is needed neither to build nor to
read. Reading: `TfdsSource(dir)` opens `tfds.builder_from_directory(dir)
.as_data_source("train")` (random access, picklable) and feeds the same grain
pipeline as the JSON source (`PipelineConfig(tfds_dir=...)`).

Each record holds the decoded media already resized and center-cropped as uint8
`frames[T, S, S, 3]` (`media.decode_pixels`, the pipeline's decoder before
normalization: images padded to a square first when `image_aspect="pad"`; T = 1 for
images, 0 for text only). uint8, not float32: 4x smaller, and since
resize + crop produce uint8 anyway, `image.normalize` of the stored bytes gives
bit-identical floats to preprocessing the file. Long-video samples store their
features float32[T, N+1, C] (`media.decode_features`, uncapped; and the stored
Q-Former prompt, if any). S and (N+1, C) come from the model's `InputSpec`. The
conversation is stored as JSON text; tokenization stays at read time (template and
tokenizer are training choices).

Media that cannot be read are skipped at build time, counted and logged; the build
stops with `DataError` past the skip budget (`skips.SkipBudget`: skips > max_skip_rate
x samples once min(min_samples_for_skip_rate, dataset size) were seen, checked after
each skip and at the end).
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import tensorflow_datasets as tfds

from llamavid_jax.data import DataError, SampleError
from llamavid_jax.data import frames as frames_lib
from llamavid_jax.data import media as media_lib
from llamavid_jax.data import sources as sources_lib
from llamavid_jax.data.skips import Skip, SkipBudget

if TYPE_CHECKING:
  from llamavid_jax.models.config import InputSpec

log = logging.getLogger(__name__)


class LlavaMedia(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of a LLaVA-format dataset (one `train` split)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "uint8 frames [T, S, S, 3] or float32 features [T, N+1, C]."}
  # No download checksums / metadata files next to this module: TFDS would look
  # them up through `importlib_resources`, which it does not depend on.
  code_path = None

  def __init__(self, *, json_path: str, spec: InputSpec, image_folder: str = "",
               video_folder: str = "", image_aspect: str = "pad", video_fps: float | None = 1.0,
               max_frames: int | None = None, max_skip_rate: float = 0.01,
               min_samples_for_skip_rate: int = 100, **kwargs):
    self._json_path = json_path
    self._folders = dict(image_folder=image_folder, video_folder=video_folder)
    self._image_size, self._aspect = spec.image_size, image_aspect
    self._fps, self._max_frames = video_fps, max_frames
    self._feature_shape = tuple(spec.feature_shape)
    self._max_skip_rate, self._min_samples = max_skip_rate, min_samples_for_skip_rate
    self.skip_counts: dict[str, int] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self._image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="LLaVA-format samples with decoded media (llamavid_jax).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "conversations": tfds.features.Text(),  # JSON
            "kind": tfds.features.Text(),  # none | frames | features
            "frames": tfds.features.Tensor(shape=(None, s, s, 3), dtype=np.uint8),
            "features": tfds.features.Tensor(shape=(None, *self._feature_shape), dtype=np.float32),
            "prompt": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(image_size=s, image_aspect=self._aspect),
        disable_shuffling=True,  # records in JSON order; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    src = sources_lib.LlavaJsonSource(self._json_path, **self._folders)
    # a whole dataset smaller than min_samples is enough samples at its end
    budget = SkipBudget(self._max_skip_rate, min(self._min_samples, len(src)))
    where = f" building {self._json_path}"
    for i in range(len(src)):
      sample = src[i]
      budget.seen = i + 1
      try:
        example = self._example(sample)
      except SampleError as e:
        budget.record(Skip.of(sample, e))
        self.skip_counts = dict(budget.counts)
        log.warning("build: skipped %s", budget.last.message())
        budget.check(where)
        continue
      yield i, example
    budget.check(where)

  def _example(self, sample: sources_lib.RawSample) -> dict:
    """The record of `sample`; raises `SampleError`."""
    s = self._image_size
    example = {"id": sample.id, "conversations": json.dumps(sample.conversations), "kind": "none",
               "frames": np.zeros((0, s, s, 3), np.uint8),
               "features": np.zeros((0, *self._feature_shape), np.float32), "prompt": ""}
    if sample.kind == "features":   # stored uncapped: the pipeline caps at read time
      feats, prompt = media_lib.decode_features(sample, feature_shape=self._feature_shape)
      example.update(kind="features", features=feats, prompt=prompt or "")
    elif sample.kind != "none":
      example.update(kind="frames", frames=media_lib.decode_pixels(
          sample, image_size=s, image_aspect=self._aspect, fps=self._fps, max_frames=self._max_frames))
    return example


def build_dataset(json_path: str, data_dir: str, spec: InputSpec, **kwargs) -> str:
  """Builds the ArrayRecord dataset under `data_dir`; returns its directory.

  Args:
    json_path: the LLaVA JSON.
    data_dir: TFDS data root.
    spec: the model's `InputSpec` (image size and feature shape of the records).
    **kwargs: `LlavaMedia` options (folders, image_aspect, video_fps, max_frames,
      max_skip_rate, min_samples_for_skip_rate).
  """
  builder = LlavaMedia(json_path=json_path, spec=spec, data_dir=data_dir, file_format="array_record",
                       **kwargs)
  builder.download_and_prepare()
  return str(builder.data_dir)


class TfdsSource:
  """Random-access source over a built dataset (`build_dataset`'s directory)."""

  def __init__(self, dataset_dir: str, split: str = "train"):
    if not os.path.isdir(dataset_dir):
      raise DataError(f"TFDS dataset directory not found: {dataset_dir}")
    builder = tfds.builder_from_directory(dataset_dir)
    self.image_size = int(builder.info.metadata["image_size"])
    self._ds = builder.as_data_source(split=split)
    self.path = dataset_dir

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> sources_lib.RawSample:
    r = self._ds[index]
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    kind = text(r["kind"])
    return sources_lib.RawSample(
        index, text(r["id"]), json.loads(text(r["conversations"])), kind, self.path,
        frames=r["frames"] if kind == "frames" else None,
        features=r["features"] if kind == "features" else None,
        prompt=text(r["prompt"]) or None)

  def num_frames(self, sample: sources_lib.RawSample, *, fps: float | None,
                 max_frames: int | None) -> int:
    del fps  # frames were sampled at build time
    n = {"frames": lambda: len(sample.frames), "features": lambda: len(sample.features)}.get(
        sample.kind, lambda: 0)()
    if sample.kind == "frames" and n > (max_frames or n):
      raise SampleError("frame_count_mismatch", "frames",
                        f"{n} stored frames > max_frames {max_frames}", self.path)
    return len(frames_lib.uniform_cap(n, max_frames)) if sample.kind == "features" else n
