"""Data: LLaVA-format samples -> fixed-shape numpy batches.

Modules (import them directly; this package keeps its import light):
  conversation  templates (`vicuna_v1`, `imgsp_v1`, `plain_guided`) -> ids, labels
  tokenizer     local LLM / Q-Former tokenizer loaders
  image         pad-to-square + CLIP preprocessing (numpy / PIL)
  frames        the release's frame choice (indices and counts; pure)
  video         PyAV decoding at 1 fps (`load_video`)
  sources       LLaVA JSON reader, feature files, random-access sources
  features      movie feature files: the release's .pkl read without running it,
                .safetensors written (`python -m llamavid_jax.data.features convert`);
                the `extract` command (videos -> features, `llamavid_jax/extract.py`)
  subtitles     .srt / .vtt cues and the release's rule placing them on frames (`inputs`)
  media         one decoder of a sample's media (`decode`), for pipeline and TFDS
  buckets       sample lengths -> bucket (`choose_bucket`; pure)
  rows          encoded text + decoded media -> padded rows, batches
  skips         `Skip` and the one skip budget (`SkipBudget`)
  plan          the planning verdicts once: manifest cache, parallel probing, I/O retries,
                shared by every process (hash-checked)
  pipeline      grain pipeline: plan (shuffle, shard, bucket), batch, skip accounting
  tfds_builder  LLaVA JSON + media -> ArrayRecord (TFDS), read back without TF

Errors: a bad sample raises `SampleError` inside the per-sample code; the
pipeline turns it into a counted, logged skip. `DataError` stops the pipeline
(too many skips, a broken dataset file). The model's side (tokens per frame, image
size, feature shape, video mode: clip or movie) comes in as its `InputSpec`, never
restated in a data config.
"""

from __future__ import annotations


class SampleError(Exception):
  """One sample cannot be used. Caught by the pipeline, counted and logged.

  Attributes:
    reason: short machine-readable tag, e.g. `missing_file`, `no_gpt_turn`.
    field: the sample field at fault, e.g. `image`, `conversations`.
    detail: human-readable explanation.
    path: the file involved, if any.
  """

  def __init__(self, reason: str, field: str, detail: str, path: str | None = None):
    self.reason, self.field, self.detail, self.path = reason, field, detail, path
    super().__init__(self.describe())

  def describe(self, sample_id: str | None = None) -> str:
    where = f"sample {sample_id!r} " if sample_id is not None else ""
    file = f" (file {self.path})" if self.path else ""
    return f"{where}field {self.field!r}{file}: {self.reason}: {self.detail}"


class DataError(RuntimeError):
  """The data pipeline cannot go on (e.g. the skip rate bound was passed)."""


IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_TOKEN = "<image>"
