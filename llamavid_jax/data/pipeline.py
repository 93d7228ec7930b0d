"""grain pipeline: samples -> fixed-shape batches, deterministic, checkpointable.

Design (why batches are planned up front):
  Training compiles once per batch shape, and on several hosts every process
  must run the same shape at the same step. So the bucket of a sample is decided
  before any media is decoded, from cheap metadata (its tokenized text length and
  its frame count from the container / feature-file header), and the sequence of
  batches is planned once, identically on every process:

  1. order: `grain.MapDataset.range(N).seed(seed).shuffle().repeat(num_epochs)`
     (grain's index shuffle, reshuffled each epoch).
  2. each sample goes to its bucket (the verdicts come from `plan`: computed once,
     cached as a manifest, shared by every process; `buckets.choose_bucket`: the smallest
     `(max_text_len, max_frames[, prompts])` that fits, separately for frame and
     feature samples); samples that fit none, or whose text is invalid, or whose
     media file is missing / unreadable at probe time, are skipped here (counted
     and logged).
  3. walking the order, samples fill per-bucket global batches of
     `batch_size * process_count` rows; a full one is emitted. At the end, the
     partly filled ones are emitted padded with rows of index -1.
  4. process p takes rows `[p * batch_size, (p + 1) * batch_size)` of each.

  The planned batches are a `grain.MapDataset`; `.map` does the per-sample work
  (tokenize, `media.decode`, `rows.fill_row` to the bucket), `.to_iter_dataset`
  and `.mp_prefetch` run it in worker processes. A sample that fails there
  (truncated image, undecodable video, ...) becomes a padding row, so shapes never
  change; its skip travels with the batch to the main process, where
  `_AccountingIterator` counts it, logs it and checks the skip budget
  (`skips.SkipBudget`, the same rule as planning's), raising `DataError` past it.
  Iterator state = the global index of the next batch + the budget's counters
  (`BatchIterator.get_state` / `set_state`): no process count in it, so a run saved
  with N processes resumes with M (same global batch size: the same global batches).

The model's side comes in as its `InputSpec` (`LlamaVidConfig.input_spec`: tokens per
frame, image size, feature shape, video mode), never restated in `PipelineConfig`.

Movie mode (`spec.movie`, the release's long-video stage): a sample's `video` is a movie
feature file (`.safetensors` with `inputs` metadata; `features.py` converts the
release's `.pkl`). Its human turn's `<image>` becomes the movie's `inputs`, "..."
removed (one `<image>` per frame among the subtitles; `conversation`, "Movies"), its one
instruction is that turn without `<image>`, its features are the file's without CLS
(`media.decode_movie`), and it is bucketed by its whole text (subtitles and frame
placeholders included; `buckets`). Planning reads the `inputs` from the file's header
(`sources.movie_header`); `inputs` must hold one placeholder per frame (`bad_inputs`),
a movie is never resampled (`too_long` past `max_frames`), other media are `not_a_movie`.

Batch: the rows of `rows` stacked, B = batch_size of them (S = bucket text length,
T = bucket frames, P = bucket instruction slots, Lq = qformer_max_len):
  input_ids int32[B, S], labels int32[B, S], text_mask bool[B, S],
  frames float32[B, T, H, W, 3] or features [B, T, N+1, C] (movie: [B, T, N, C]) of
  `feature_dtype`, frame_mask bool[B, T],
  qformer_ids int32[B, P, Lq], qformer_mask bool[B, P, Lq], sample_index int64[B].
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from llamavid_jax.data import DataError, SampleError
from llamavid_jax.data import buckets as buckets_lib
from llamavid_jax.data import conversation as conv_lib
from llamavid_jax.data import media as media_lib
from llamavid_jax.data import rows as rows_lib
from llamavid_jax.data import sources as sources_lib
from llamavid_jax.data.buckets import BucketKey
from llamavid_jax.data.skips import Skip, SkipBudget
from llamavid_jax.models.config import InputSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Data pipeline settings (the model's side is `make_pipeline`'s `spec`).

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
      positions in the model's spliced sequence (`splice.spliced_length`).
    batch_size: rows per batch on this process.
    seed: shuffle seed.
    num_epochs: passes over the data (each reshuffled).
    worker_count: worker processes (0: the calling process does the work).
    read_threads: grain read threads per process.
    max_skip_rate: stop with `DataError` when skipped / seen passes this ...
    min_samples_for_skip_rate: ... once this many samples were seen.
    image_aspect: `pad` (pad to a square of the mean colour, release) or `crop`.
    video_fps: sampling rate for videos (None: every frame).
    max_frames: frame cap per video / feature file (uniform resampling).
    max_len: LLM sequence limit after the visual tokens are spliced in.
    qformer_max_len: Q-Former instruction length (left truncation, padded).
    feature_dtype: dtype of the `features` rows: `float32`, or `float16` / `bfloat16`
      (half the host memory and transfer of a long movie; the model casts inside).
    plan_cache_dir: where the plan manifest goes when the data folder is read-only
      (`plan`; "" = $LLAMAVID_PLAN_CACHE or ~/.cache/llamavid_jax/plans).
    plan_threads: threads probing media headers while planning.
    io_attempts: tries of a file read failing with an I/O hiccup (planning and loading;
      exponential backoff) before the sample becomes the skip `io_error`.
  """

  data_path: str = ""
  image_folder: str = ""
  video_folder: str = ""
  tfds_dir: str = ""
  llm_tokenizer: str = ""
  qformer_tokenizer: str = ""
  template: str = "imgsp_v1"
  buckets: tuple[tuple[int, ...], ...] = ((256, 1), (1024, 1), (2048, 64), (2048, 300))
  batch_size: int = 4
  seed: int = 0
  num_epochs: int = 1
  worker_count: int = 0
  read_threads: int = 1
  max_skip_rate: float = 0.01
  min_samples_for_skip_rate: int = 100
  image_aspect: str = "pad"
  video_fps: float | None = 1.0
  max_frames: int | None = 300
  max_len: int = 2048
  qformer_max_len: int = 256
  feature_dtype: str = "float32"
  plan_cache_dir: str = ""
  plan_threads: int = 16
  io_attempts: int = 4


FEATURE_DTYPES = ("float32", "float16", "bfloat16")


def feature_dtype(name: str) -> np.dtype:
  """A `PipelineConfig.feature_dtype` name -> numpy dtype (bfloat16 from ml_dtypes)."""
  if name not in FEATURE_DTYPES:
    raise ValueError(f"feature_dtype {name!r}: expected one of {list(FEATURE_DTYPES)}")
  if name == "bfloat16":
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The planned batches of this process.

  Attributes:
    batches: per batch, (bucket key, int64[B] source indices, -1 = padding row);
      a `BucketKey` (`frames` | `features`, index into `config.buckets`).
    skips: samples dropped while planning, one entry per source index.
    num_samples: source size.
    digest: sha256 (hex) of the global batch list, the same on every process of a run
      (`plan.check_same` compares it before step 0).
  """

  batches: list[tuple[BucketKey, np.ndarray]]
  skips: list[Skip]
  num_samples: int
  digest: str = ""


class SampleProcessor:
  """Turns source samples into padded rows and batches; picklable for workers.

  Args:
    config: the settings.
    spec: the model's `InputSpec` (tokens per frame, image size, feature shape).
    source: the random-access source.
    llm_tokenizer, qformer_tokenizer: the tokenizers.
  """

  def __init__(self, config: PipelineConfig, spec: InputSpec, source: sources_lib.Source,
               llm_tokenizer, qformer_tokenizer):
    self.config, self.spec, self.source = config, spec, source
    self.template = conv_lib.get_template(config.template)
    self.llm_tok, self.q_tok = llm_tokenizer, qformer_tokenizer
    self.buckets = buckets_lib.as_buckets(config.buckets)
    self.feature_dtype = feature_dtype(config.feature_dtype)
    if spec.movie and self.template.style == "plain":
      raise ValueError(f"template {config.template!r} has no human turn for a movie's inputs (video_mode 'movie')")
    self.planned: dict[int, BucketKey | Skip] = {}   # planning's per-sample verdicts

  def with_config(self, config: PipelineConfig) -> SampleProcessor:
    """The same processor for other settings of equal buckets, sharing the planning
    verdicts (a second plan, e.g. for more epochs, re-reads no sample)."""
    if tuple(config.buckets) != tuple(self.config.buckets):
      raise ValueError("with_config: the buckets differ, the planning verdicts would not hold")
    other = SampleProcessor(config, self.spec, self.source, self.llm_tok, self.q_tok)
    other.planned = self.planned
    return other

  def __getstate__(self):   # workers need no planning verdicts
    return {**self.__dict__, "planned": {}}

  # ---- metadata (planning) ----------------------------------------------------------

  def encode_text(self, sample: sources_lib.RawSample, movie_inputs: str | None = None) -> conv_lib.EncodedText:
    # imgsp_v1's coin flips: the same for a sample in planning, in workers, after restore
    rng = np.random.default_rng([self.config.seed, sample.index])
    return conv_lib.encode_conversation(sample.conversations, self.llm_tok, self.template,
                                        has_media=sample.has_media, rng=rng, movie_inputs=movie_inputs)

  def is_movie(self, sample: sources_lib.RawSample) -> bool:
    """Movie mode and a sample with media (text-only samples stay text)."""
    return self.spec.movie and sample.has_media

  def probe(self, sample: sources_lib.RawSample):
    """The media metadata planning needs, read from file headers (the I/O of planning,
    run in a thread pool by `plan.probe_all`): a movie's (shape, inputs), else the frame
    count. Raises `SampleError`, or `OSError` for an I/O hiccup (`sources.is_transient`)."""
    if self.is_movie(sample):
      return sources_lib.movie_header(media_lib.movie_path(sample))
    return self.source.num_frames(sample, fps=self.config.video_fps, max_frames=self.config.max_frames)

  def bucket_of(self, sample: sources_lib.RawSample, probed=None) -> BucketKey:
    """The bucket key of `sample` from `probed` (`probe`'s result, or the `SampleError`
    it raised; None: probe now); raises `SampleError` (too long, bad text, ...): a
    sample's text is judged before its media, as ever."""
    cfg = self.config
    if probed is None:
      try:
        probed = self.probe(sample)
      except SampleError as e:
        probed = e
    if self.is_movie(sample):
      if isinstance(probed, SampleError):
        raise probed
      shape, inputs = probed
      media_lib.check_movie_length(shape[0], cfg.max_frames, sample.path)
      enc, frames, prompts = self.encode_text(sample, inputs), shape[0], 1
    else:
      enc = self.encode_text(sample)
      if isinstance(probed, SampleError):
        raise probed
      frames = probed
      prompts = enc.num_images
    return buckets_lib.choose_bucket(len(enc.input_ids), frames, prompts,
                                     features=sample.kind == "features", buckets=self.buckets,
                                     spec=self.spec, max_len=cfg.max_len)

  # ---- per-sample work (workers) ------------------------------------------------------

  def empty_row(self, key: BucketKey) -> dict[str, np.ndarray]:
    """The padding row of bucket `key`."""
    return rows_lib.empty_row(key[0], self.buckets[key[1]], self.spec,
                              qformer_max_len=self.config.qformer_max_len,
                              pad_id=self.llm_tok.pad_token_id, feature_dtype=self.feature_dtype)

  def example(self, index: int, key: BucketKey) -> dict[str, np.ndarray]:
    """The padded row of source sample `index` in bucket `key`; raises `SampleError`."""
    cfg = self.config
    sample = self.source[index]
    if self.is_movie(sample):
      return self._movie_example(sample, key)
    enc = self.encode_text(sample)
    rows_lib.check_fits(enc, self.buckets[key[1]])
    instructions, visual = enc.instructions[: enc.num_images], None
    if sample.has_media:
      visual, prompt = media_lib.decode(sample, self.spec, image_aspect=cfg.image_aspect,
                                        fps=cfg.video_fps, max_frames=cfg.max_frames)
      if prompt is not None:   # stored with long-video features: the release's one prompt for all
        instructions = (prompt,) * enc.num_images
    qs = (self.q_tok(list(instructions), truncation=True, max_length=cfg.qformer_max_len).input_ids
          if instructions else [])
    return rows_lib.fill_row(self.empty_row(key), key[0], index, enc, visual, qs, sample.path)

  def _movie_example(self, sample: sources_lib.RawSample, key: BucketKey) -> dict[str, np.ndarray]:
    """A movie's row: the text with its `inputs`, one instruction, features without CLS."""
    cfg = self.config
    visual, inputs = media_lib.decode_movie(sample, self.spec, max_frames=cfg.max_frames)
    enc = self.encode_text(sample, inputs)
    rows_lib.check_fits(enc, self.buckets[key[1]], num_prompts=1)
    qs = self.q_tok(list(enc.instructions), truncation=True, max_length=cfg.qformer_max_len).input_ids
    return rows_lib.fill_row(self.empty_row(key), key[0], sample.index, enc, visual, qs, sample.path)

  def _example_with_retries(self, index: int, key: BucketKey) -> dict[str, np.ndarray]:
    """`example`, retried on an I/O hiccup (`plan.with_retries`); a persistent one is a
    `SampleError` (`io_error`), so the row is padding, as for a bad file."""
    from llamavid_jax.data import plan as plan_lib

    policy = plan_lib.RetryPolicy(attempts=self.config.io_attempts)
    try:
      return plan_lib.with_retries(lambda: self.example(index, key), f"loading sample index {index}", policy)
    except OSError as e:
      raise plan_lib.io_error(self.source[index], e, policy.attempts) from None

  def make_batch(self, spec: tuple[BucketKey, np.ndarray]) -> dict[str, Any]:
    """Planned batch -> stacked rows, plus `_skips` and `_attempted` for accounting."""
    key, indices = spec
    rows, skips = [], []
    for index in indices:
      if index < 0:
        rows.append(self.empty_row(key))
        continue
      try:
        rows.append(self._example_with_retries(int(index), key))
      except SampleError as e:
        skips.append(dataclasses.asdict(Skip.of(self.source[int(index)], e)))
        rows.append(self.empty_row(key))
    batch = rows_lib.stack_rows(rows)
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
  pending: dict[BucketKey, list[int]] = collections.defaultdict(list)
  global_batches: list[tuple[BucketKey, list[int]]] = []
  for i in range(len(order)):
    index = int(order[i])
    if index not in verdicts:   # not planned by `plan` beforehand: probed here, one by one
      from llamavid_jax.data import plan as plan_lib

      sample = processor.source[index]
      try:
        verdicts[index] = processor.bucket_of(
            sample, plan_lib.probe_one(processor, index, plan_lib.RetryPolicy(attempts=config.io_attempts)))
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
  return Plan(batches, skips, n, plan_digest(global_batches, n))


def plan_digest(global_batches, num_samples: int) -> str:
  """sha256 (hex) of the global batch list: each batch's bucket key and source indices."""
  import hashlib

  h = hashlib.sha256(str(num_samples).encode())
  for key, rows in global_batches:
    h.update(f"{key.kind}:{key.index};".encode())
    h.update(np.asarray(rows, np.int64).tobytes())
  return h.hexdigest()


def skip_budget(config: PipelineConfig) -> SkipBudget:
  """The config's skip budget (`max_skip_rate`, `min_samples_for_skip_rate`)."""
  return SkipBudget(config.max_skip_rate, config.min_samples_for_skip_rate)


class BatchIterator:
  """This process's batches from a global batch index on, counting and logging skips
  (raising past the skip budget).

  State (`get_state` / `set_state`): `batch_index`, the global index of the next batch
  (the same on every process, for any process count: every process walks the same
  global batch list), and the skip counters `seen` / `skips` of this process's rows.
  `set_state` moves to `batch_index` by rebuilding the grain iterator there (nothing
  before it is read), so a state saved with N processes positions a run of M."""

  def __init__(self, pipeline: Pipeline, batch_index: int = 0):
    self._pipeline, self.batch_index = pipeline, batch_index
    self._budget = skip_budget(pipeline.config)
    self._it = None   # the grain iterator from `batch_index`, made at the first `next`

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = iter(self._pipeline.dataset_from(self.batch_index))
    batch = dict(next(self._it))
    self.batch_index += 1
    skips = [Skip(**s) for s in batch.pop("_skips")]
    self._budget.seen += int(batch.pop("_attempted"))
    for skip in skips:
      self._budget.record(skip)
      log.warning("skipped %s", skip.message())
    if skips:
      self._budget.check()
    return batch

  @property
  def skip_counts(self) -> dict[str, int]:
    return dict(self._budget.counts)

  @property
  def seen(self) -> int:
    return self._budget.seen

  def get_state(self) -> dict[str, Any]:
    return {"batch_index": self.batch_index, **self._budget.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not 0 <= int(state["batch_index"]) <= len(self._pipeline):
      raise DataError(f"data state batch_index={state['batch_index']}: the plan has {len(self._pipeline)} batches")
    self.close()
    self.batch_index = int(state["batch_index"])
    self._budget.set_state(state)

  def close(self) -> None:
    """Stops the grain iterator's workers (if any); a later `next` starts them again."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


class Pipeline:
  """A planned, checkpointable data pipeline. `iter(pipeline)` gives batches
  (a `BatchIterator`).

  Attributes:
    config: the settings.
    plan: this process's planned batches and the planning-time skips.
  """

  def __init__(self, config: PipelineConfig, processor: SampleProcessor, plan: Plan):
    self.config, self.processor, self.plan = config, processor, plan
    self._batches = grain.MapDataset.source(plan.batches).map(processor.make_batch)

  def dataset_from(self, batch_index: int) -> grain.IterDataset:
    """The grain `IterDataset` of this process's batches from global batch `batch_index` on."""
    config = self.config
    it = self._batches[batch_index:].to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=max(1, 2 * config.read_threads)))
    if config.worker_count > 0:
      _ensure_absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return it

  def __len__(self) -> int:
    return len(self.plan.batches)

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self)

  @property
  def batch_shapes(self) -> list[dict[str, tuple[int, ...]]]:
    """The distinct batch shapes of this plan (what training will compile for)."""
    keys = sorted({key for key, _ in self.plan.batches})
    return [{k: (self.config.batch_size, *np.shape(v)) for k, v in self.processor.empty_row(key).items()}
            for key in keys]


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; a program not started by absl.app has
  not parsed them, which grain reports as an error. Use the defaults then."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_pipeline(config: PipelineConfig, spec: InputSpec, *, source: sources_lib.Source | None = None,
                  llm_tokenizer=None, qformer_tokenizer=None, shard_index: int | None = None,
                  shard_count: int | None = None, processor: SampleProcessor | None = None) -> Pipeline:
  """Builds the pipeline of this process.

  Args:
    config: the settings.
    spec: the model's `InputSpec` (`LlamaVidConfig.input_spec`).
    source: a random-access source; default: `config.tfds_dir` (a `TfdsSource`)
      or `config.data_path` (a `LlavaJsonSource`).
    llm_tokenizer, qformer_tokenizer: tokenizers; default: loaded from the
      config's directories.
    shard_index, shard_count: default: this JAX process and the process count
      (grain's `ShardByJaxProcess`).
    processor: an earlier pipeline's `processor` (same source, tokenizers, buckets and
      spec): its planning verdicts are reused, so no sample is probed or logged twice.

  Raises:
    DataError: unreadable dataset, or a planning-time skip rate above the bound.
    ValueError: `processor` was made for another spec or other buckets.
  """
  from llamavid_jax.data import tokenizer as tok_lib

  if processor is not None:
    if processor.spec != spec:
      raise ValueError(f"make_pipeline: the processor was made for {processor.spec}, not {spec}")
    return _planned_pipeline(config, processor.with_config(config), shard_index, shard_count)
  if source is None:
    if config.tfds_dir and spec.movie:
      raise ValueError("video_mode 'movie' reads movie feature files through the JSON source "
                       "(the TFDS builder stores no `inputs`)")
    if config.tfds_dir:
      from llamavid_jax.data import tfds_builder

      source = tfds_builder.TfdsSource(config.tfds_dir)
    else:
      source = sources_lib.LlavaJsonSource(config.data_path, image_folder=config.image_folder,
                                           video_folder=config.video_folder)
  llm_tokenizer = llm_tokenizer or tok_lib.load_llm_tokenizer(config.llm_tokenizer)
  qformer_tokenizer = qformer_tokenizer or tok_lib.load_qformer_tokenizer(
      config.qformer_tokenizer, max_length=config.qformer_max_len)
  processor = SampleProcessor(config, spec, source, llm_tokenizer, qformer_tokenizer)
  return _planned_pipeline(config, processor, shard_index, shard_count)


def _planned_pipeline(config, processor, shard_index, shard_count) -> Pipeline:
  import jax

  from llamavid_jax.data import plan as plan_lib

  if shard_index is None or shard_count is None:
    shard = grain.sharding.ShardByJaxProcess()
    shard_index, shard_count = shard.shard_index, shard.shard_count
  pods = shard_count == jax.process_count() > 1   # one shard per JAX process: they plan together
  if len(processor.planned) < len(processor.source):   # else an earlier plan's verdicts
    kw = dict(cache_dir=config.plan_cache_dir or None, threads=config.plan_threads,
              policy=plan_lib.RetryPolicy(attempts=config.io_attempts))
    if pods:
      plan_lib.shared_verdicts(processor, **kw)
    else:
      processor.planned.update(plan_lib.load_or_build(processor, **kw)[0])
  plan = plan_batches(config, processor, shard_index=shard_index, shard_count=shard_count)
  if pods:
    plan_lib.check_same(plan.digest, "data plans (hash of the global batch list)")
  _check_plan_skips(config, plan)
  return Pipeline(config, processor, plan)


def _check_plan_skips(config: PipelineConfig, plan: Plan) -> None:
  budget = skip_budget(config)
  budget.seen = plan.num_samples
  for skip in plan.skips:
    budget.record(skip)
  budget.check(" while planning")
  if plan.num_samples and len(plan.skips) == plan.num_samples:   # fewer samples than min_skip_samples
    last = plan.skips[-1]
    raise DataError(f"every one of the {plan.num_samples:,} samples was skipped while planning; last: "
                    f"{last.message()}; by reason: {dict(budget.counts)}")


__all__ = ["PipelineConfig", "Pipeline", "BatchIterator", "Plan", "Skip", "SampleProcessor", "make_pipeline",
           "plan_batches", "skip_budget"]
