"""The length contract and the splice: where each LLM position of a sample comes from.

Clip mode (images, short video): a sample's text has up to P `<image>` placeholders
(id -200); the r-th expands to that sample's valid frames x tokens_per_frame visual
tokens made with its r-th instruction. With static shapes the LLM sequence is

  S' = spliced_length(S, T, tokens_per_frame, P) = S + P * (T * tokens_per_frame - 1)

for S text positions and T frame slots.

Movie mode (the release's long video): the text has one placeholder per frame, with
subtitles between them, and the t-th placeholder expands to frame t's tokens alone. It
is the clip rule with T placeholder slots of one frame each:

  S' = spliced_length(S, T, tokens_per_frame, movie=True) = S + T * (tokens_per_frame - 1)

(the instruction slots P play no part: one instruction serves every frame). The release
repeats each `<image>` video_token = 2 times and writes the frame tokens, in order, onto
the -200 positions, so that frame t's [context, content] land on the 2t-th and 2t+1-th;
the empty text between two repeated `<image>` tokenizes to no ids, so one placeholder
per frame expanded to tokens_per_frame positions is the same LLM sequence.

Every place that sizes an LLM sequence (the model, decoding caches, the data
pipeline's buckets, FLOP counts, benches) calls `spliced_length`; `splice_layout` is
the gather that realises it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

IGNORE = -100


def placeholder_slots(num_frames: int, num_prompts: int = 1, movie: bool = False) -> tuple[int, int]:
  """(placeholder slots, frame slots per placeholder): (P, T) in clip mode, (T, 1) in
  movie mode."""
  return (num_frames, 1) if movie else (num_prompts, num_frames)


def spliced_length(text_len: int, num_frames: int, tokens_per_frame: int, num_prompts: int = 1, *,
                   movie: bool = False) -> int:
  """S' LLM positions for S text positions and T frame slots: S + P*(T*tokens_per_frame - 1)
  with P placeholder slots (clip), S + T*(tokens_per_frame - 1) (movie: T placeholders
  of one frame each). A sample without frames keeps its text: S' = S."""
  slots, frames = placeholder_slots(num_frames, num_prompts, movie)
  k = frames * tokens_per_frame
  return text_len + slots * (k - 1) if k else text_len


def batch_spliced_length(batch: dict, tokens_per_frame: int, *, movie: bool = False) -> int:
  """S' of a batch of model inputs, from its shapes (static under jit): input_ids [B, S],
  frame_mask [B, T], qformer_ids [B, P, L] (or [B, L]: P = 1)."""
  q = batch["qformer_ids"]
  return spliced_length(batch["input_ids"].shape[1], batch["frame_mask"].shape[1], tokens_per_frame,
                        q.shape[1] if q.ndim == 3 else 1, movie=movie)


class Layout(NamedTuple):
  """Where each of the S' LLM positions comes from (`spliced_length`)."""
  text_idx: jax.Array   # int32[B, S'] index into the text ids
  prompt_idx: jax.Array  # int32[B, S'] which placeholder (visual positions): the instruction
                         # (clip) or the frame (movie)
  vis_idx: jax.Array    # int32[B, S'] index into that placeholder's visual tokens
  is_vis: jax.Array     # bool[B, S']
  valid: jax.Array      # bool[B, S'] a real token (text or visual), not padding


def splice_layout(input_ids: jax.Array, text_mask: jax.Array, frame_mask: jax.Array,
                  tokens_per_frame: int, image_token_id: int = -200, num_prompts: int = 1, *,
                  movie: bool = False) -> Layout:
  """input_ids, text_mask: [B, S]; frame_mask: bool[B, T] -> Layout over S' positions.

  Clip: each placeholder (at most `num_prompts` per sample) expands to the sample's
  valid_frames * tokens_per_frame visual tokens; a sample without one keeps its text.
  Movie: the r-th placeholder expands to frame r's tokens_per_frame tokens (prompt_idx
  r, vis_idx 0 .. tokens_per_frame - 1); the data gives a sample one placeholder per
  valid frame, so padding frame slots have none and drop out."""
  if movie:   # T placeholder slots of one (always valid) frame each
    t = frame_mask.shape[1]
    frame_mask, num_prompts = jnp.ones((frame_mask.shape[0], min(t, 1)), bool), max(t, 1)
  b, s = input_ids.shape
  k = frame_mask.shape[1] * tokens_per_frame
  s_out = spliced_length(s, frame_mask.shape[1], tokens_per_frame, num_prompts)
  text_mask = text_mask.astype(bool)
  is_img = (input_ids == image_token_id) & text_mask
  nv = (frame_mask.sum(axis=1) * tokens_per_frame)[:, None] if k else jnp.zeros((b, 1), jnp.int32)
  before = jnp.cumsum(is_img, axis=1) - is_img                        # placeholders before i
  start = jnp.arange(s)[None] + before * (nv - 1)                       # output position of i
  j = jnp.arange(s_out)
  src = jax.vmap(lambda st: jnp.searchsorted(st, j, side="right") - 1)(start)   # [B, S']
  src = jnp.clip(src, 0, s - 1)
  offset = j[None] - jnp.take_along_axis(start, src, 1)
  src_img = jnp.take_along_axis(is_img, src, 1)
  is_vis = src_img & (offset < nv)
  is_text = ~src_img & (offset == 0) & jnp.take_along_axis(text_mask, src, 1)
  prompt = jnp.clip(jnp.take_along_axis(before, src, 1), 0, num_prompts - 1)
  return Layout(src.astype(jnp.int32), prompt.astype(jnp.int32), jnp.clip(offset, 0, max(k - 1, 0)).astype(jnp.int32),
                is_vis, is_vis | is_text)


def splice_labels(labels: jax.Array, layout: Layout) -> jax.Array:
  """int32[B, S] text labels -> int32[B, S'] (IGNORE on visual tokens and padding)."""
  out = jnp.take_along_axis(labels, layout.text_idx, 1)
  return jnp.where(layout.valid & ~layout.is_vis, out, IGNORE)
