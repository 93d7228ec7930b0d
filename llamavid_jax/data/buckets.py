"""Bucketing: a sample's measured lengths -> the bucket it is batched in. Pure (no I/O,
no tokenizer).

A bucket is (S text positions, T frame slots, P instruction slots); its rows become
`spliced_length(S, T, tokens_per_frame, P)` LLM positions in the model. A sample with
s text tokens, t frames and p `<image>` placeholders

  - must fit the model: spliced_length(s, t, tokens_per_frame, p) <= max_len
    (else `too_long`);
  - goes to the bucket of the smallest spliced length (then the smallest (S, T, P),
    then the first) with s <= S and t <= T (else `too_long`) and p <= P (else
    `too_many_turns`);
  - separately for frame and feature samples (`BucketKey.kind`).

In movie mode (`InputSpec.movie`) the text holds one placeholder per frame among the
subtitles, so s counts the t placeholders and the subtitles' tokens, a row takes
spliced_length(S, T, tokens_per_frame, movie=True) = S + T * (tokens_per_frame - 1)
positions, and a sample needs one instruction slot (P >= 1).
"""

from __future__ import annotations

from typing import Iterable, Literal, NamedTuple, Sequence

from llamavid_jax.data import IMAGE_TOKEN, SampleError
from llamavid_jax.models.config import InputSpec
from llamavid_jax.models.splice import spliced_length


class Bucket(NamedTuple):
  """One row shape: S text positions, T frame slots, P instruction slots."""
  text_len: int
  frames: int
  prompts: int = 1


class BucketKey(NamedTuple):
  """Where a sample is batched: `frames` (images, videos, stored frames, text) or
  `features` buckets, and the index into the bucket table."""
  kind: Literal["frames", "features"]
  index: int


def as_bucket(b: Sequence[int]) -> Bucket:
  """(S, T) or (S, T, P) from a config -> Bucket; P defaults to 1."""
  b = tuple(int(x) for x in b)
  if len(b) not in (2, 3) or (len(b) == 3 and b[2] < 1):
    raise ValueError(f"bucket {b}: expected (max_text_len, max_frames[, prompts])")
  return Bucket(*b)


def as_buckets(table: Iterable[Sequence[int]]) -> tuple[Bucket, ...]:
  """A config's bucket table -> Buckets."""
  return tuple(as_bucket(b) for b in table)


def llm_length(bucket: Bucket, spec: InputSpec) -> int:
  """S' LLM positions of a row of `bucket` in the model."""
  return spliced_length(bucket.text_len, bucket.frames, spec.tokens_per_frame, bucket.prompts, movie=spec.movie)


def choose_bucket(text_len: int, num_frames: int, num_prompts: int, *, features: bool,
                  buckets: Sequence[Bucket], spec: InputSpec, max_len: int) -> BucketKey:
  """The bucket of a sample of `text_len` tokens, `num_frames` frames (or feature steps)
  and `num_prompts` instruction slots to fill (clip: its placeholders; movie: 1, its
  frame placeholders are in `text_len`); raises `SampleError` (field `conversations`)."""
  tpf = spec.tokens_per_frame
  full_len = spliced_length(text_len, num_frames, tpf, num_prompts, movie=spec.movie)
  if full_len > max_len:
    if spec.movie:
      visual = f" (with {num_frames} frame placeholders) + {num_frames} frames x ({tpf} tokens - 1) = {full_len}"
    else:
      visual = (f" + {num_prompts} placeholder(s) x ({num_frames} frames x {tpf} tokens - 1) = {full_len}"
                if num_prompts else "")
    raise SampleError("too_long", "conversations", f"{text_len} text tokens{visual} > max_len {max_len}")
  table = [tuple(b) for b in buckets]
  fits = [i for i, b in enumerate(buckets) if text_len <= b.text_len and num_frames <= b.frames]
  if not fits:
    raise SampleError("too_long", "conversations",
                      f"{text_len} text tokens, {num_frames} frames fit no bucket {table}")
  fits = [i for i in fits if num_prompts <= buckets[i].prompts]
  if not fits:
    raise SampleError("too_many_turns", "conversations",
                      f"{num_prompts} {IMAGE_TOKEN} placeholders (one per human turn) fit no "
                      f"bucket's instruction slots {table}")
  best = min(fits, key=lambda i: (llm_length(buckets[i], spec), table[i], i))
  return BucketKey("features" if features else "frames", best)
