"""One plan, built once: every sample's planning verdict, cached as a manifest and shared
by every process.

The planning pass gives each source sample a verdict: its `BucketKey` (from its text
length and its frame count, read from the media file's header) or the `Skip` that
drops it. It is the only part of planning that reads files, so it runs once:

  - `load_or_build`: the manifest of the source is read if there is one, else the
    verdicts are computed (`compute_verdicts`: the headers probed by a thread pool with
    a tqdm bar, the text encoded in the calling thread) and the manifest written.
  - The manifest is `<data file>.plan-<key>.json` next to the data, or, where that
    folder is read-only, under `$LLAMAVID_PLAN_CACHE` (default
    `~/.cache/llamavid_jax/plans`). `key` = sha256 of the source file's content and
    of every setting a verdict depends on (`planning_key`), so an edited data file or
    another config plans again. A plan with an I/O-error skip is not cached.
  - Several processes (`shared_verdicts`): every process checks that it holds the same
    planning key, process 0 loads or builds the verdicts and broadcasts them
    (`jax.experimental.multihost_utils`), so every host has the same skips; then
    `pipeline` checks the hash of the global batch list (`check_same`) before step 0.
    A mismatch stops every host with `PlanMismatchError` naming both hashes.

I/O errors are not data errors: an `OSError` of an I/O hiccup (`sources.is_transient`)
while probing is retried with exponential backoff (`RetryPolicy`, logged); one that
persists becomes the skip `io_error`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
import zlib
from typing import Any, Callable

import numpy as np

from llamavid_jax.data import SampleError
from llamavid_jax.data import sources as sources_lib
from llamavid_jax.data.buckets import BucketKey
from llamavid_jax.data.skips import Skip

log = logging.getLogger(__name__)
SKIPS_NAMED = 5   # skips logged one by one while planning; the rest are counted in one line

MANIFEST_VERSION = 1
CACHE_ENV = "LLAMAVID_PLAN_CACHE"
IO_ERROR = "io_error"
Verdict = BucketKey | Skip


class PlanMismatchError(RuntimeError):
  """The processes hold different plans (or data files, or planning configs)."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """attempts in all (1: no retry); the delay doubles from base_delay_s up to max_delay_s."""
  attempts: int = 4
  base_delay_s: float = 0.1
  max_delay_s: float = 2.0


def with_retries(fn: Callable[[], Any], what: str, policy: RetryPolicy = RetryPolicy(),
                 sleep: Callable[[float], None] = time.sleep):
  """fn(), retried while it raises a transient `OSError` (`sources.is_transient`), each
  retry logged; the last attempt's error propagates."""
  for attempt in range(1, policy.attempts + 1):
    try:
      return fn()
    except OSError as e:
      if not sources_lib.is_transient(e) or attempt == policy.attempts:
        raise
      delay = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
      log.warning("%s: %s: %s (attempt %d of %d); retrying in %.2f s", what, type(e).__name__, e, attempt,
                  policy.attempts, delay)
      sleep(delay)
  raise AssertionError("unreachable")


def io_error(sample: sources_lib.RawSample, e: OSError, attempts: int) -> SampleError:
  """The skip of a sample whose file kept failing with `e`."""
  field = "image" if sample.kind == "image" else "video"
  return SampleError(IO_ERROR, field, f"{type(e).__name__}: {e} (after {attempts} attempts)", sample.path)


def probe_one(processor, index: int, policy: RetryPolicy):
  """`processor.probe` of sample `index` with retries -> its result or its `SampleError`."""
  sample = processor.source[index]
  try:
    return with_retries(lambda: processor.probe(sample), f"probing sample {sample.id!r} ({sample.path})", policy)
  except SampleError as e:
    return e
  except OSError as e:
    return io_error(sample, e, policy.attempts if sources_lib.is_transient(e) else 1)


def compute_verdicts(processor, *, threads: int = 16, progress: bool = True,
                     policy: RetryPolicy = RetryPolicy()) -> dict[int, Verdict]:
  """Every sample's verdict: headers probed by `threads` threads (the I/O), text encoded
  and bucketed here (tokenizers stay on one thread); the first `SKIPS_NAMED` skips logged,
  the rest summed up in one line by reason."""
  from tqdm import tqdm

  n = len(processor.source)
  verdicts: dict[int, Verdict] = {}
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool, \
       tqdm(total=n, desc="planning", unit=" samples", disable=not progress, mininterval=1.0) as bar:
    probed = pool.map(lambda i: probe_one(processor, i, policy), range(n))
    for index, p in enumerate(probed):
      sample = processor.source[index]
      try:
        verdicts[index] = processor.bucket_of(sample, p)
      except SampleError as e:
        verdicts[index] = Skip.of(sample, e)
      bar.update(1)
  log_skips(verdicts)
  return verdicts


def log_skips(verdicts: dict[int, Verdict]) -> None:
  """Logs the first `SKIPS_NAMED` skips one by one and the rest in one line, by reason
  ("2,949 of 9,830 samples skipped (missing_file 2,949), first 5 named above")."""
  skips = [v for _, v in sorted(verdicts.items()) if isinstance(v, Skip)]
  for v in skips[:SKIPS_NAMED]:
    log.warning("skipped %s", v.message())
  if len(skips) > SKIPS_NAMED:
    reasons = collections.Counter(v.reason for v in skips)
    by_reason = ", ".join(f"{r} {k:,}" for r, k in reasons.most_common())
    log.warning("%s of %s samples skipped (%s), first %d named above", f"{len(skips):,}", f"{len(verdicts):,}",
                by_reason, SKIPS_NAMED)


# ---- the manifest -------------------------------------------------------------------------

def file_digest(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def source_digest(source) -> str | None:
  """The content hash of a source's data file (`json_path`), or its `content_digest()`;
  None where it has neither (then nothing is cached)."""
  if hasattr(source, "content_digest"):
    return source.content_digest()
  path = getattr(source, "json_path", None)
  return file_digest(path) if path else None


def planning_key(processor) -> str:
  """sha256 of what the verdicts depend on: the data file's content, the media folders,
  the template, buckets, seed (imgsp_v1's coin flips), fps, frame cap, max_len, the
  model's `InputSpec`."""
  c, src = processor.config, processor.source
  facts = dict(version=MANIFEST_VERSION, source=source_digest(src), num_samples=len(src),
               image_folder=os.path.abspath(getattr(src, "image_folder", "") or ""),
               video_folder=os.path.abspath(getattr(src, "video_folder", "") or ""),
               template=c.template, buckets=[list(b) for b in c.buckets], seed=c.seed,
               video_fps=c.video_fps, max_frames=c.max_frames, max_len=c.max_len,
               spec=repr(processor.spec))
  return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def manifest_paths(processor, key: str, cache_dir: str | None = None) -> list[str]:
  """Where the manifest may be: next to the data file, then the cache folder."""
  path = getattr(processor.source, "json_path", None)
  if not path:
    return []
  name = f"{os.path.basename(path)}.plan-{key[:16]}.json"
  cache = cache_dir or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "llamavid_jax", "plans")
  return [os.path.join(os.path.dirname(os.path.abspath(path)), name), os.path.join(cache, name)]


def encode(verdicts: dict[int, Verdict], key: str) -> dict:
  rows = [list(v) if isinstance(v, BucketKey) else dataclasses.asdict(v)
          for _, v in sorted(verdicts.items())]
  return dict(version=MANIFEST_VERSION, key=key, num_samples=len(rows), verdicts=rows)


def decode(manifest: dict) -> dict[int, Verdict]:
  return {i: BucketKey(v[0], int(v[1])) if isinstance(v, list) else Skip(**v)
          for i, v in enumerate(manifest["verdicts"])}


def read_manifest(path: str, key: str, num_samples: int) -> dict[int, Verdict] | None:
  """The verdicts of the manifest at `path` if it is this plan's, else None (logged)."""
  try:
    with open(path) as f:
      m = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    log.warning("plan manifest %s unreadable (%s: %s); planning again", path, type(e).__name__, e)
    return None
  if m.get("version") != MANIFEST_VERSION or m.get("key") != key or m.get("num_samples") != num_samples:
    log.warning("plan manifest %s is not this plan's; planning again", path)
    return None
  return decode(m)


def write_manifest(paths: list[str], manifest: dict) -> str | None:
  """Writes the manifest to the first writable path (atomically); -> that path."""
  text = json.dumps(manifest, separators=(",", ":"))
  for path in paths:
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        f.write(text)
      os.replace(tmp, path)
      return path
    except OSError as e:
      log.info("cannot write the plan manifest %s (%s); trying the next place", path, e)
  log.warning("the plan manifest could not be written (tried %s)", paths)
  return None


def load_or_build(processor, *, cache_dir: str | None = None, threads: int = 16, progress: bool = True,
                  policy: RetryPolicy = RetryPolicy()) -> tuple[dict[int, Verdict], str, str]:
  """-> (verdicts, planning key, where: the manifest read or written, or "" if none)."""
  key, n = planning_key(processor), len(processor.source)
  paths = manifest_paths(processor, key, cache_dir) if source_digest(processor.source) else []
  for path in paths:
    verdicts = read_manifest(path, key, n)
    if verdicts is not None:
      log.info("plan read from %s", path)
      log_skips(verdicts)   # the skips are reported as if planned now
      return verdicts, key, path
  verdicts = compute_verdicts(processor, threads=threads, progress=progress, policy=policy)
  if any(isinstance(v, Skip) and v.reason == IO_ERROR for v in verdicts.values()):
    log.warning("the plan has I/O-error skips: not cached (a rerun probes again)")
    return verdicts, key, ""
  return verdicts, key, (write_manifest(paths, encode(verdicts, key)) or "") if paths else ""


# ---- several processes ----------------------------------------------------------------------

def check_same(digest: str, what: str) -> None:
  """Every process holds the same hex `digest` (a sha256), or every process raises
  `PlanMismatchError` naming process 0's and the first differing one's."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return
  mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  for p in range(1, len(every)):
    if not np.array_equal(every[p], every[0]):
      raise PlanMismatchError(
          f"the processes hold different {what}: process 0 has {every[0].tobytes().hex()}, process {p} has "
          f"{every[p].tobytes().hex()}; every host must read the same data file with the same config")


def broadcast_bytes(payload: bytes) -> bytes:
  """process 0's `payload` on every process."""
  from jax.experimental import multihost_utils

  n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(payload), np.int32)))
  buf = np.zeros(n, np.uint8)
  if payload:
    buf[:] = np.frombuffer(payload, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


def shared_verdicts(processor, *, cache_dir: str | None = None, threads: int = 16, progress: bool = True,
                    policy: RetryPolicy = RetryPolicy()) -> str:
  """Fills `processor.planned` with every sample's verdict, the same on every process:
  one process checks the planning key, loads or builds; several check that they hold
  the same key, then process 0 loads or builds and broadcasts. -> the planning key."""
  import jax

  kw = dict(cache_dir=cache_dir, threads=threads, progress=progress, policy=policy)
  if jax.process_count() == 1:
    verdicts, key, _ = load_or_build(processor, **kw)
  else:
    key = planning_key(processor)
    check_same(key, "planning keys (data file content hash + planning config)")
    payload = b""
    if jax.process_index() == 0:
      verdicts, _, _ = load_or_build(processor, **kw)
      payload = zlib.compress(json.dumps(encode(verdicts, key)).encode())
    verdicts = decode(json.loads(zlib.decompress(broadcast_bytes(payload))))
  processor.planned.update(verdicts)
  return key
