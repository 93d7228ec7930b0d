"""grain pipeline: samples -> fixed-shape batches, deterministic, checkpointable.

Design (why batches are planned up front):
  Training compiles once per batch shape, and on several hosts every process
  must run the same shape at the same step. So the bucket of a sample is decided
  before any media is decoded, from cheap metadata (its tokenized text length and
  its frame count from the container / feature-file header), and the sequence of
  batches is planned once, identically on every process:

  1. order: `grain.MapDataset.range(N).seed(seed).shuffle().repeat(num_epochs)`
     (grain's index shuffle, reshuffled each epoch).
  2. each sample goes to the smallest bucket `(max_text_len, max_frames)` that
     fits (separately for frame and feature samples); samples that fit none, or
     whose text is invalid, or whose media file is missing / unreadable at probe
     time, are skipped here (counted and logged).
  3. walking the order, samples fill per-bucket global batches of
     `batch_size * process_count` rows; a full one is emitted. At the end, the
     partly filled ones are emitted padded with rows of index -1.
  4. process p takes rows `[p * batch_size, (p + 1) * batch_size)` of each.

  The planned batches are a `grain.MapDataset`; `.map` does the per-sample work
  (decode, preprocess, tokenize, pad to the bucket), `.to_iter_dataset` and
  `.mp_prefetch` run it in worker processes. A sample that fails there (truncated
  image, undecodable video, ...) becomes a padding row, so shapes never change;
  its skip travels with the batch to the main process, where `_AccountingIterator`
  counts it, logs it and raises `DataError` once skips / samples > max_skip_rate.
  Iterator state = grain's state + these counters (`get_state` / `set_state`).

Batch (B = batch_size, S = bucket text length, T = bucket frames, P = bucket
instruction slots, Lq = qformer_max_len):
  input_ids     int32[B, S]    LLM ids, -200 image placeholders (at most P per row)
  labels        int32[B, S]    -100 = ignored
  text_mask     bool[B, S]
  frames        float32[B, T, H, W, 3]   CLIP-normalized (frame buckets), or
  features      float32[B, T, N+1, C]    precomputed ViT features (feature buckets)
  frame_mask    bool[B, T]     valid frames first; all False for text-only rows
  qformer_ids   int32[B, P, Lq]  BERT ids of each placeholder's instruction
                                 (left-truncated); the r-th -200 of a row uses slot r
  qformer_mask  bool[B, P, Lq]   all False in unused slots
  sample_index  int64[B]       index into the source; -1 for padding rows
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from llamavid_jax.data import IGNORE_INDEX, DataError, SampleError
from llamavid_jax.data import conversation as conv_lib
from llamavid_jax.data import image as image_lib
from llamavid_jax.data import sources as sources_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Data pipeline settings.

  Attributes:
    data_path: LLaVA-format JSON (ignored when `tfds_dir` is set).
    image_folder, video_folder: media roots of the JSON's relative paths.
    tfds_dir: a dataset built by `tfds_builder` (its version directory).
    llm_tokenizer, qformer_tokenizer: local tokenizer directories.
    template: `vicuna_v1`, `imgsp_v1` or `plain_guided`.
    buckets: (max_text_len, max_frames[, prompts]) tuples; a sample goes to the
      smallest fit. `prompts` (default 1) is P, the instruction slots: `imgsp_v1`
      gives one placeholder per human turn, so multi-turn image data wants P > 1;
      each slot costs a Q-Former pass per frame and T * tokens_per_frame - 1 LLM
      positions in the model's spliced sequence.
    batch_size: rows per batch on this process.
    seed: shuffle seed.
    num_epochs: passes over the data (each reshuffled).
    worker_count: worker processes (0: the calling process does the work).
    read_threads: grain read threads per process.
    max_skip_rate: stop with `DataError` when skipped / seen passes this ...
    min_samples_for_skip_rate: ... once this many samples were seen.
    image_size: square input side of the ViT (224 or 336).
    image_aspect: `pad` (pad to a square of the mean colour, release) or `crop`.
    video_fps: sampling rate for videos (None: every frame).
    max_frames: frame cap per video / feature file (uniform resampling).
    tokens_per_frame: LLM tokens per frame (2 for video models).
    max_len: LLM sequence limit after the visual tokens are spliced in.
    qformer_max_len: Q-Former instruction length (left truncation, padded).
    feature_shape: (N+1, C) of precomputed features.
  """

  data_path: str = ""
  image_folder: str = ""
  video_folder: str = ""
  tfds_dir: str = ""
  llm_tokenizer: str = ""
  qformer_tokenizer: str = ""
  template: str = "imgsp_v1"
  buckets: tuple[tuple[int, int], ...] = ((256, 1), (1024, 1), (2048, 64), (2048, 300))
  batch_size: int = 4
  seed: int = 0
  num_epochs: int = 1
  worker_count: int = 0
  read_threads: int = 1
  max_skip_rate: float = 0.01
  min_samples_for_skip_rate: int = 100
  image_size: int = 224
  image_aspect: str = "pad"
  video_fps: float | None = 1.0
  max_frames: int | None = 300
  tokens_per_frame: int = 2
  max_len: int = 2048
  qformer_max_len: int = 256
  feature_shape: tuple[int, int] = (257, 1408)


@dataclasses.dataclass(frozen=True)
class Skip:
  """A skipped sample: where it is and why."""

  index: int
  id: str
  reason: str
  field: str
  detail: str
  path: str | None = None

  @classmethod
  def of(cls, sample: sources_lib.RawSample, err: SampleError) -> Skip:
    return cls(sample.index, sample.id, err.reason, err.field, err.detail, err.path or sample.path)

  def message(self) -> str:
    file = f" (file {self.path})" if self.path else ""
    return (f"sample {self.id!r} (index {self.index}) field {self.field!r}{file}: "
            f"{self.reason}: {self.detail}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """The planned batches of this process.

  Attributes:
    batches: per batch, (bucket key, int64[B] source indices, -1 = padding row);
      a bucket key is (`frames` | `features`, index into `config.buckets`).
    skips: samples dropped while planning, one entry per source index.
    num_samples: source size.
  """

  batches: list[tuple[tuple[str, int], np.ndarray]]
  skips: list[Skip]
  num_samples: int


def _bucket(b) -> tuple[int, int, int]:
  """(S, T) or (S, T, P) -> (S, T, P); P defaults to 1."""
  b = tuple(int(x) for x in b)
  if len(b) not in (2, 3) or (len(b) == 3 and b[2] < 1):
    raise ValueError(f"bucket {b}: expected (max_text_len, max_frames[, prompts])")
  return b if len(b) == 3 else (*b, 1)


class SampleProcessor:
  """Turns source samples into padded rows and batches; picklable for workers."""

  def __init__(self, config: PipelineConfig, source: sources_lib.Source, llm_tokenizer,
               qformer_tokenizer):
    self.config, self.source = config, source
    self.template = conv_lib.get_template(config.template)
    self.llm_tok, self.q_tok = llm_tokenizer, qformer_tokenizer
    self.buckets = [_bucket(b) for b in config.buckets]   # (S, T, P)
    self.planned: dict[int, tuple[str, int] | Skip] = {}   # planning's per-sample verdicts

  def with_config(self, config: PipelineConfig) -> SampleProcessor:
    """The same processor for other settings of equal buckets, sharing the planning
    verdicts (a second plan, e.g. for more epochs, re-reads no sample)."""
    if tuple(config.buckets) != tuple(self.config.buckets):
      raise ValueError("with_config: the buckets differ, the planning verdicts would not hold")
    other = SampleProcessor(config, self.source, self.llm_tok, self.q_tok)
    other.planned = self.planned
    return other

  def __getstate__(self):   # workers need no planning verdicts
    return {**self.__dict__, "planned": {}}

  # ---- metadata (planning) ----------------------------------------------------------

  def encode_text(self, sample: sources_lib.RawSample) -> conv_lib.EncodedText:
    # imgsp_v1's coin flips: the same for a sample in planning, in workers, after restore
    rng = np.random.default_rng([self.config.seed, sample.index])
    return conv_lib.encode_conversation(sample.conversations, self.llm_tok, self.template,
                                        has_media=sample.has_media, rng=rng)

  def bucket_of(self, sample: sources_lib.RawSample) -> tuple[str, int]:
    """The bucket key of `sample`; raises `SampleError` (too long, bad text, ...)."""
    cfg = self.config
    enc = self.encode_text(sample)
    text_len, n_img = len(enc.input_ids), enc.num_images
    frames = self.source.num_frames(sample, fps=cfg.video_fps, max_frames=cfg.max_frames)
    full_len = text_len + n_img * (frames * cfg.tokens_per_frame - 1)
    if full_len > cfg.max_len:
      visual = (f" + {n_img} placeholder(s) x ({frames} frames x {cfg.tokens_per_frame} tokens - 1) = {full_len}"
                if n_img else "")
      raise SampleError("too_long", "conversations",
                        f"{text_len} text tokens{visual} > max_len {cfg.max_len}")
    fits = [i for i, (s, t, _) in enumerate(self.buckets) if text_len <= s and frames <= t]
    if not fits:
      raise SampleError("too_long", "conversations",
                        f"{text_len} text tokens, {frames} frames fit no bucket {self.buckets}")
    fits = [i for i in fits if n_img <= self.buckets[i][2]]
    if not fits:
      raise SampleError("too_many_turns", "conversations",
                        f"{n_img} {conv_lib.IMAGE_TOKEN} placeholders (one per human turn) fit no "
                        f"bucket's instruction slots {self.buckets}")
    s_out = lambda i: self.buckets[i][0] + self.buckets[i][2] * (self.buckets[i][1] * cfg.tokens_per_frame - 1)
    best = min(fits, key=lambda i: (s_out(i), self.buckets[i], i))
    return ("features" if sample.kind == "features" else "frames", best)

  # ---- per-sample work (workers) ------------------------------------------------------

  def _visual(self, sample: sources_lib.RawSample) -> tuple[np.ndarray, str | None]:
    """float32[T, S, S, 3] frames or float32[T, N+1, C] features; stored prompt."""
    cfg = self.config
    if sample.kind == "image":
      img = image_lib.load_image(sample.path)
      return image_lib.preprocess_image(img, size=cfg.image_size, aspect=cfg.image_aspect)[None], None
    if sample.kind == "frames":
      if sample.frames.shape[1:] != (cfg.image_size, cfg.image_size, 3):
        raise SampleError("bad_frames", "frames", f"stored frames {sample.frames.shape[1:]}, expected "
                          f"{(cfg.image_size, cfg.image_size, 3)}", sample.path)
      return image_lib.normalize(sample.frames), None
    if sample.kind == "video":
      from llamavid_jax.data import video as video_lib

      try:
        frames, _ = video_lib.load_video(sample.path, fps=cfg.video_fps, max_frames=cfg.max_frames)
      except video_lib.VideoError as e:
        raise SampleError("unreadable_video", "video", str(getattr(e, "reason", e)), sample.path) from None
      if len(frames) == 0:
        raise SampleError("empty_video", "video", "no frames decoded", sample.path)
      return image_lib.preprocess_frames(frames, size=cfg.image_size), None
    if sample.kind == "features":
      if sample.features is not None:
        feats, prompt = sample.features, sample.prompt
      else:
        feats, prompt = sources_lib.load_features(sample.path)
      if feats.ndim != 3 or feats.shape[1:] != tuple(cfg.feature_shape) or not len(feats):
        raise SampleError("bad_features", "video",
                          f"shape {feats.shape}, expected [T>0, {cfg.feature_shape[0]}, "
                          f"{cfg.feature_shape[1]}]", sample.path)
      if cfg.max_frames and len(feats) > cfg.max_frames:
        feats = feats[np.linspace(0, len(feats) - 1, cfg.max_frames).round().astype(int)]
      return feats.astype(np.float32), prompt
    raise ValueError(f"unknown media kind {sample.kind!r}")

  def _empty_row(self, key: tuple[str, int]) -> dict[str, np.ndarray]:
    cfg = self.config
    text_len, frames, prompts = self.buckets[key[1]]
    vis_shape = ((frames, *cfg.feature_shape) if key[0] == "features"
                 else (frames, cfg.image_size, cfg.image_size, 3))
    return {
        "input_ids": np.full(text_len, self.llm_tok.pad_token_id, np.int32),
        "labels": np.full(text_len, IGNORE_INDEX, np.int32),
        "text_mask": np.zeros(text_len, bool),
        key[0]: np.zeros(vis_shape, np.float32),
        "frame_mask": np.zeros(frames, bool),
        "qformer_ids": np.zeros((prompts, cfg.qformer_max_len), np.int32),
        "qformer_mask": np.zeros((prompts, cfg.qformer_max_len), bool),
        "sample_index": np.int64(-1),
    }

  def example(self, index: int, key: tuple[str, int]) -> dict[str, np.ndarray]:
    """The padded row of source sample `index` in bucket `key`; raises `SampleError`."""
    sample = self.source[index]
    enc = self.encode_text(sample)
    row = self._empty_row(key)
    text_len, max_frames, prompts = self.buckets[key[1]]
    if len(enc.input_ids) > text_len or enc.num_images > prompts:  # the plan said it fits: the source changed
      raise SampleError("too_long", "conversations", f"{len(enc.input_ids)} tokens, {enc.num_images} "
                        f"placeholders > bucket {self.buckets[key[1]]}")
    instructions = enc.instructions[: enc.num_images]
    if sample.has_media:
      vis, prompt = self._visual(sample)
      if prompt is not None:   # stored with long-video features: the release's one prompt for all
        instructions = (prompt,) * enc.num_images
      if len(vis) > max_frames:
        raise SampleError("frame_count_mismatch", "video",
                          f"{len(vis)} frames decoded, {max_frames} planned from metadata", sample.path)
      row[key[0]][: len(vis)] = vis
      row["frame_mask"][: len(vis)] = True
    n = len(enc.input_ids)
    row["input_ids"][:n], row["labels"][:n], row["text_mask"][:n] = enc.input_ids, enc.labels, True
    qs = (self.q_tok(list(instructions), truncation=True, max_length=self.config.qformer_max_len).input_ids
          if instructions else [])
    for r, q in enumerate(qs):
      row["qformer_ids"][r, : len(q)], row["qformer_mask"][r, : len(q)] = q, True
    row["sample_index"] = np.int64(index)
    return row

  def make_batch(self, spec: tuple[tuple[str, int], np.ndarray]) -> dict[str, Any]:
    """Planned batch -> stacked rows, plus `_skips` and `_attempted` for accounting."""
    key, indices = spec
    rows, skips = [], []
    for index in indices:
      if index < 0:
        rows.append(self._empty_row(key))
        continue
      try:
        rows.append(self.example(int(index), key))
      except SampleError as e:
        skips.append(dataclasses.asdict(Skip.of(self.source[int(index)], e)))
        rows.append(self._empty_row(key))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["_skips"] = skips
    batch["_attempted"] = int((np.asarray(indices) >= 0).sum())
    return batch


def plan_batches(config: PipelineConfig, processor: SampleProcessor, *, shard_index: int,
                 shard_count: int) -> Plan:
  """Plans this shard's batches (see module docstring); deterministic in the seed."""
  n = len(processor.source)
  if n == 0:
    raise DataError("the data source is empty")
  order = grain.MapDataset.range(n).seed(config.seed).shuffle().repeat(config.num_epochs)
  verdicts = processor.planned     # index -> bucket key or Skip, kept across plans
  skips: list[Skip] = []
  skipped: set[int] = set()
  global_bs = config.batch_size * shard_count
  pending: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
  global_batches: list[tuple[tuple[str, int], list[int]]] = []
  for i in range(len(order)):
    index = int(order[i])
    if index not in verdicts:
      sample = processor.source[index]
      try:
        verdicts[index] = processor.bucket_of(sample)
      except SampleError as e:
        verdicts[index] = Skip.of(sample, e)
        log.warning("skipped %s", verdicts[index].message())
    key = verdicts[index]
    if isinstance(key, Skip):
      if index not in skipped:
        skipped.add(index)
        skips.append(key)
      continue
    pending[key].append(index)
    if len(pending[key]) == global_bs:
      global_batches.append((key, pending.pop(key)))
  for key in sorted(pending):
    global_batches.append((key, pending[key] + [-1] * (global_bs - len(pending[key]))))
  lo, hi = shard_index * config.batch_size, (shard_index + 1) * config.batch_size
  batches = [(key, np.asarray(rows[lo:hi], np.int64)) for key, rows in global_batches]
  return Plan(batches, skips, n)


class _AccountingIterator(grain.DatasetIterator):
  """Counts and logs skips of the batches, raises past the skip bound; checkpointable."""

  def __init__(self, parent: grain.DatasetIterator, config: PipelineConfig):
    super().__init__(parent)
    self._config = config
    self._seen = 0
    self._skips: collections.Counter[str] = collections.Counter()

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._parent))
    skips = [Skip(**s) for s in batch.pop("_skips")]
    self._seen += int(batch.pop("_attempted"))
    for skip in skips:
      self._skips[skip.reason] += 1
      log.warning("skipped %s", skip.message())
    total = sum(self._skips.values())
    cfg = self._config
    if skips and self._seen >= cfg.min_samples_for_skip_rate and total > cfg.max_skip_rate * self._seen:
      raise DataError(
          f"skip rate {total}/{self._seen} = {total / self._seen:.3f} exceeds max_skip_rate "
          f"{cfg.max_skip_rate}; last: {skips[-1].message()}; by reason: {dict(self._skips)}")
    return batch

  @property
  def skip_counts(self) -> dict[str, int]:
    return dict(self._skips)

  @property
  def seen(self) -> int:
    return self._seen

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "seen": self._seen, "skips": dict(self._skips)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._seen = int(state["seen"])
    self._skips = collections.Counter({k: int(v) for k, v in state["skips"].items()})


class _AccountingDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, config: PipelineConfig):
    super().__init__(parent)
    self._config = config

  def __iter__(self) -> _AccountingIterator:
    return _AccountingIterator(self._parent.__iter__(), self._config)


class Pipeline:
  """A planned, checkpointable data pipeline. `iter(pipeline)` gives batches.

  Attributes:
    config: the settings.
    plan: this process's planned batches and the planning-time skips.
    dataset: the grain `IterDataset` of batches.
  """

  def __init__(self, config: PipelineConfig, processor: SampleProcessor, plan: Plan):
    self.config, self.processor, self.plan = config, processor, plan
    ds = grain.MapDataset.source(plan.batches).map(processor.make_batch)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=max(1, 2 * config.read_threads)))
    if config.worker_count > 0:
      _ensure_absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    self.dataset = _AccountingDataset(it, config)

  def __len__(self) -> int:
    return len(self.plan.batches)

  def __iter__(self) -> _AccountingIterator:
    return iter(self.dataset)

  @property
  def batch_shapes(self) -> list[dict[str, tuple[int, ...]]]:
    """The distinct batch shapes of this plan (what training will compile for)."""
    keys = sorted({key for key, _ in self.plan.batches})
    return [{k: (self.config.batch_size, *np.shape(v)) for k, v in self.processor._empty_row(key).items()}
            for key in keys]


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; a program not started by absl.app has
  not parsed them, which grain reports as an error. Use the defaults then."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_pipeline(config: PipelineConfig, *, source: sources_lib.Source | None = None,
                  llm_tokenizer=None, qformer_tokenizer=None, shard_index: int | None = None,
                  shard_count: int | None = None, processor: SampleProcessor | None = None) -> Pipeline:
  """Builds the pipeline of this process.

  Args:
    config: the settings.
    source: a random-access source; default: `config.tfds_dir` (a `TfdsSource`)
      or `config.data_path` (a `LlavaJsonSource`).
    llm_tokenizer, qformer_tokenizer: tokenizers; default: loaded from the
      config's directories.
    shard_index, shard_count: default: this JAX process and the process count
      (grain's `ShardByJaxProcess`).
    processor: an earlier pipeline's `processor` (same source, tokenizers and buckets):
      its planning verdicts are reused, so no sample is probed or logged twice.

  Raises:
    DataError: unreadable dataset, or a planning-time skip rate above the bound.
  """
  from llamavid_jax.data import tokenizer as tok_lib

  if processor is not None:
    return _planned_pipeline(config, processor.with_config(config), shard_index, shard_count)
  if source is None:
    if config.tfds_dir:
      from llamavid_jax.data import tfds_builder

      source = tfds_builder.TfdsSource(config.tfds_dir)
    else:
      source = sources_lib.LlavaJsonSource(config.data_path, image_folder=config.image_folder,
                                           video_folder=config.video_folder)
  llm_tokenizer = llm_tokenizer or tok_lib.load_llm_tokenizer(config.llm_tokenizer)
  qformer_tokenizer = qformer_tokenizer or tok_lib.load_qformer_tokenizer(
      config.qformer_tokenizer, max_length=config.qformer_max_len)
  processor = SampleProcessor(config, source, llm_tokenizer, qformer_tokenizer)
  return _planned_pipeline(config, processor, shard_index, shard_count)


def _planned_pipeline(config, processor, shard_index, shard_count) -> Pipeline:
  if shard_index is None or shard_count is None:
    shard = grain.sharding.ShardByJaxProcess()
    shard_index, shard_count = shard.shard_index, shard.shard_count
  plan = plan_batches(config, processor, shard_index=shard_index, shard_count=shard_count)
  _check_plan_skips(config, plan)
  return Pipeline(config, processor, plan)


def _check_plan_skips(config: PipelineConfig, plan: Plan) -> None:
  n, k = plan.num_samples, len(plan.skips)
  if k and n >= config.min_samples_for_skip_rate and k > config.max_skip_rate * n:
    by_reason = dict(collections.Counter(s.reason for s in plan.skips))
    raise DataError(
        f"skip rate {k}/{n} = {k / n:.3f} exceeds max_skip_rate {config.max_skip_rate} while "
        f"planning; last: {plan.skips[-1].message()}; by reason: {by_reason}")


__all__ = ["PipelineConfig", "Pipeline", "Plan", "Skip", "SampleProcessor", "make_pipeline",
           "plan_batches"]
