"""In-memory batch source with the data pipeline's contract, for tests and benchmarks.

Batches are a pure function of (seed, batch index): random prompt ids with one
`<image>` placeholder, labels on the last 1..2*answer_len text tokens, random frames or
features. Each process yields its own rows of the global batch. State = the global index
of the next batch (`batch_index`: the same for any process count).
"""

from __future__ import annotations

import numpy as np


class ToyBatches:
  def __init__(self, cfg, global_batch: int, text_len: int, num_frames: int, qformer_len: int,
               use_features: bool = False, seed: int = 0, process_index: int = 0, process_count: int = 1,
               answer_len: int = 4, nan_batch: int = -1):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} not divisible by {process_count} processes")
    self.cfg, self.b, self.s, self.t, self.lq = cfg, global_batch, text_len, num_frames, qformer_len
    self.features, self.seed, self.answer_len = use_features, seed, answer_len
    n = global_batch // process_count
    self.rows = slice(process_index * n, (process_index + 1) * n)
    self.index = 0
    self.nan_batch = nan_batch   # this batch's visual input is NaN (tests of the NaN guard)

  def get_state(self) -> dict:
    return {"batch_index": self.index}

  def set_state(self, state: dict):
    self.index = int(state["batch_index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.make(self.index)
    self.index += 1
    return {k: v[self.rows] for k, v in batch.items()}

  def make(self, index: int) -> dict:
    """The global batch number `index`."""
    c, b, s, t = self.cfg, self.b, self.s, self.t
    rng = np.random.default_rng([self.seed, index])
    ids = rng.integers(3, c.llm.vocab_size, (b, s), dtype=np.int32)
    lengths = rng.integers(s // 2, s + 1, b)
    text_mask = np.arange(s)[None] < lengths[:, None]
    ids[:, 1] = c.image_token_id
    ids = np.where(text_mask, ids, 0)
    pos = np.arange(s)[None]
    answer = rng.integers(1, 2 * self.answer_len + 1, b)     # unequal token counts per sample
    labels = np.where((pos >= lengths[:, None] - answer[:, None]) & text_mask, ids, -100).astype(np.int32)
    nf = rng.integers(1, t + 1, b)
    frame_mask = np.arange(t)[None] < nf[:, None]
    lq = rng.integers(2, self.lq + 1, b)
    out = dict(input_ids=ids, labels=labels, text_mask=text_mask, frame_mask=frame_mask,
               qformer_ids=rng.integers(1, c.qformer.vocab_size, (b, self.lq), dtype=np.int32),
               qformer_mask=np.arange(self.lq)[None] < lq[:, None],
               sample_index=(index * b + np.arange(b)).astype(np.int64))
    v = c.vision
    if self.features:
      out["features"] = rng.standard_normal((b, t, *c.feature_shape), dtype=np.float32)
    else:
      out["frames"] = rng.standard_normal((b, t, v.image_size, v.image_size, 3), dtype=np.float32)
    if index == self.nan_batch:
      out["features" if self.features else "frames"][:] = np.nan
    return out
