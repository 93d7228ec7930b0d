"""LLaVA JSON + media folders -> a TFDS ArrayRecord dataset, read back without TF.

Writing: `build_dataset(...)` runs `LlavaMedia` (a `tfds.core.GeneratorBasedBuilder`)
with `file_format="array_record"`. TFDS 4.9 encodes features with numpy and writes
ArrayRecord through `array_record`: TensorFlow is needed neither to build nor to
read. Reading: `TfdsSource(dir)` opens `tfds.builder_from_directory(dir)
.as_data_source("train")` (random access, picklable) and feeds the same grain
pipeline as the JSON source (`PipelineConfig(tfds_dir=...)`).

Each record holds the decoded media already resized and center-cropped as uint8
`frames[T, S, S, 3]` (images padded to a square first when `image_aspect="pad"`;
T = 1 for images, 0 for text only). uint8, not float32: 4x smaller, and since
resize + crop produce uint8 anyway, `image.normalize` of the stored bytes gives
bit-identical floats to preprocessing the file. Long-video samples store their
features float32[T, N+1, C] (and the stored Q-Former prompt, if any). The
conversation is stored as JSON text; tokenization stays at read time (template and
tokenizer are training choices).

Media that cannot be read are skipped at build time, counted and logged; the build
stops with `DataError` when skips / samples passes `max_skip_rate`.
"""

from __future__ import annotations

import collections
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from llamavid_jax.data import DataError, SampleError
from llamavid_jax.data import image as image_lib
from llamavid_jax.data import sources as sources_lib

log = logging.getLogger(__name__)


class LlavaMedia(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of a LLaVA-format dataset (one `train` split)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "uint8 frames [T, S, S, 3] or float32 features [T, N+1, C]."}
  # No download checksums / metadata files next to this module: TFDS would look
  # them up through `importlib_resources`, which it does not depend on.
  code_path = None

  def __init__(self, *, json_path: str, image_folder: str = "", video_folder: str = "",
               image_size: int = 224, image_aspect: str = "pad", video_fps: float | None = 1.0,
               max_frames: int | None = None, feature_shape: tuple[int, int] = (257, 1408),
               max_skip_rate: float = 0.01, **kwargs):
    self._json_path = json_path
    self._folders = dict(image_folder=image_folder, video_folder=video_folder)
    self._image_size, self._aspect = image_size, image_aspect
    self._fps, self._max_frames = video_fps, max_frames
    self._feature_shape, self._max_skip_rate = tuple(feature_shape), max_skip_rate
    self.skip_counts: collections.Counter[str] = collections.Counter()
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
    s = self._image_size
    for i in range(len(src)):
      sample = src[i]
      example = {"id": sample.id, "conversations": json.dumps(sample.conversations), "kind": "none",
                 "frames": np.zeros((0, s, s, 3), np.uint8),
                 "features": np.zeros((0, *self._feature_shape), np.float32), "prompt": ""}
      try:
        if sample.kind == "features":
          feats, prompt = sources_lib.load_features(sample.path)
          if feats.ndim != 3 or feats.shape[1:] != self._feature_shape:
            raise SampleError("bad_features", "video", f"shape {feats.shape}", sample.path)
          example.update(kind="features", features=feats, prompt=prompt or "")
        elif sample.kind != "none":
          example.update(kind="frames", frames=self._frames(sample))
      except SampleError as e:
        self._skip(sample, e, i + 1)
        continue
      yield i, example
    self._skip(None, None, len(src))

  def _frames(self, sample: sources_lib.RawSample) -> np.ndarray:
    if sample.kind == "image":
      img = image_lib.load_image(sample.path)
      return image_lib.image_to_uint8(img, size=self._image_size, aspect=self._aspect)[None]
    if sample.path.endswith(".pkl"):
      raise SampleError("pickle_features", "video", "pickled features are not read", sample.path)
    from llamavid_jax.data import video as video_lib

    try:
      frames, _ = video_lib.load_video(sample.path, fps=self._fps, max_frames=self._max_frames)
    except video_lib.VideoError as e:
      raise SampleError("unreadable_video", "video", str(getattr(e, "reason", e)), sample.path) from None
    if not len(frames):
      raise SampleError("empty_video", "video", "no frames decoded", sample.path)
    return image_lib.frames_to_uint8(frames, size=self._image_size)

  def _skip(self, sample, err: SampleError | None, seen: int) -> None:
    if err is not None:
      self.skip_counts[err.reason] += 1
      log.warning("build: skipped %s", err.describe(sample.id))
    total = sum(self.skip_counts.values())
    if total > self._max_skip_rate * seen and (err is None or seen >= 100):
      last = f"; last: {err.describe(sample.id)}" if err is not None else ""
      raise DataError(f"{self._json_path}: skip rate {total}/{seen} exceeds max_skip_rate "
                      f"{self._max_skip_rate}{last}; by reason: {dict(self.skip_counts)}")


def build_dataset(json_path: str, data_dir: str, **kwargs) -> str:
  """Builds the ArrayRecord dataset under `data_dir`; returns its directory.

  Args:
    json_path: the LLaVA JSON.
    data_dir: TFDS data root.
    **kwargs: `LlavaMedia` options (folders, image_size, image_aspect, video_fps,
      max_frames, feature_shape, max_skip_rate).
  """
  builder = LlavaMedia(json_path=json_path, data_dir=data_dir, file_format="array_record", **kwargs)
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
    return min(n, max_frames) if max_frames and sample.kind == "features" else n
