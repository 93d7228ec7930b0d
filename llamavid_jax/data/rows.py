"""Row assembly: an encoded text + decoded media -> the padded row of a bucket; rows -> a batch.

Row of bucket (S, T, P) (Lq = qformer_max_len; the batch stacks B rows):
  input_ids     int32[S]       LLM ids, -200 image placeholders (at most P; movie mode:
                               one per valid frame, among the subtitles' ids)
  labels        int32[S]       -100 = ignored
  text_mask     bool[S]
  frames        float32[T, H, W, 3]   CLIP-normalized (`frames` buckets), or
  features      float32[T, N+1, C]    precomputed ViT features (`features` buckets;
                                      movie mode: [T, N, C] without CLS; dtype
                                      `PipelineConfig.feature_dtype`)
  frame_mask    bool[T]        valid frames first; all False for text-only rows
  qformer_ids   int32[P, Lq]   BERT ids of each placeholder's instruction (left-truncated);
                               the r-th -200 of the row uses slot r
  qformer_mask  bool[P, Lq]    all False in unused slots
  sample_index  int64[]        index into the source; -1 for padding rows
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from llamavid_jax.data import IGNORE_INDEX, SampleError
from llamavid_jax.data import conversation as conv_lib
from llamavid_jax.data.buckets import Bucket

if TYPE_CHECKING:
  from llamavid_jax.models.config import InputSpec


def empty_row(kind: str, bucket: Bucket, spec: InputSpec, *, qformer_max_len: int,
              pad_id: int, feature_dtype=np.float32) -> dict[str, np.ndarray]:
  """The padding row of a `kind` (`frames` | `features`) bucket (see module docstring)."""
  s, t, p = bucket
  if kind == "features":
    vis_shape, vis_dtype = (t, *spec.feature_shape), feature_dtype
  else:
    vis_shape, vis_dtype = (t, spec.image_size, spec.image_size, 3), np.float32
  return {
      "input_ids": np.full(s, pad_id, np.int32),
      "labels": np.full(s, IGNORE_INDEX, np.int32),
      "text_mask": np.zeros(s, bool),
      kind: np.zeros(vis_shape, vis_dtype),
      "frame_mask": np.zeros(t, bool),
      "qformer_ids": np.zeros((p, qformer_max_len), np.int32),
      "qformer_mask": np.zeros((p, qformer_max_len), bool),
      "sample_index": np.int64(-1),
  }


def check_fits(enc: conv_lib.EncodedText, bucket: Bucket, num_prompts: int | None = None) -> None:
  """Raises `SampleError` (`too_long`) when the text does not fit the planned bucket
  (the source changed since planning). `num_prompts`: the instruction slots the sample
  fills (default: one per placeholder; a movie: 1)."""
  num_prompts = enc.num_images if num_prompts is None else num_prompts
  if len(enc.input_ids) > bucket.text_len or num_prompts > bucket.prompts:
    raise SampleError("too_long", "conversations", f"{len(enc.input_ids)} tokens, {num_prompts} "
                      f"instruction(s) > bucket {tuple(bucket)}")


def fill_row(row: dict[str, np.ndarray], kind: str, index: int, enc: conv_lib.EncodedText,
             visual: np.ndarray | None, qformer_ids: Sequence[Sequence[int]],
             path: str | None = None) -> dict[str, np.ndarray]:
  """Writes sample `index` into `row` (an `empty_row` of its bucket): the text, the
  visual float32[t, ...] (None: text only; t <= T), one Q-Former id list per
  placeholder. Raises `SampleError` (`frame_count_mismatch`) when t > T."""
  if visual is not None:
    max_frames = len(row["frame_mask"])
    if len(visual) > max_frames:
      raise SampleError("frame_count_mismatch", "video",
                        f"{len(visual)} frames decoded, {max_frames} planned from metadata", path)
    row[kind][: len(visual)] = visual
    row["frame_mask"][: len(visual)] = True
  n = len(enc.input_ids)
  row["input_ids"][:n], row["labels"][:n], row["text_mask"][:n] = enc.input_ids, enc.labels, True
  for r, q in enumerate(qformer_ids):
    row["qformer_ids"][r, : len(q)], row["qformer_mask"][r, : len(q)] = q, True
  row["sample_index"] = np.int64(index)
  return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """B rows -> a batch: each field stacked on a leading B axis."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
